"""Per-machine tuning results on disk: Triton config winners per autotune key, and ``auto``'s measured
backend choice per shape class.

One small JSON file per GPU model, torch version and triton version (a winner measured on one stack
says nothing about another), in the folder named by ``LORA_ENSEMBLE_CACHE_DIR`` (default
``$XDG_CACHE_HOME/lora_ensemble``, else ``~/.cache/lora_ensemble``; set it to an empty string to keep
results in memory only)::

    {"format": 1, "device": "NVIDIA H100 80GB HBM3", "torch": "2.14.1+cu130", "triton": "3.8.0",
     "triton_configs": {"<kernel>": {"<key>": {"kwargs": {...}, "num_warps": 8, "num_stages": 3,
                                               "timings_us": {...}}}},
     "auto": {"<shape class>": {"backend": "triton", "times_us": {"torch": 31.0, "triton": 12.5}}}}

The file is read once per process, on the first lookup. A file that cannot be read or parsed, or
holds something else, is ignored with a warning (and replaced on the next write). Every write merges
what other processes wrote meanwhile and replaces the file atomically (a temporary file in the same
folder, then ``os.replace``), so a reader never sees half a file; writers take turns on a lock file next to it.

The Triton path's runtime switches live here too: ``LORA_ENSEMBLE_TRITON_AUTOTUNE=0`` pins tuning
(:func:`tuning_pinned`), ``LORA_ENSEMBLE_TRITON_SPLIT_K=0`` turns split-K off (:func:`split_k_allowed`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["CACHE_DIR_VARIABLE", "FORMAT", "PIN_VARIABLE", "SPLIT_K_VARIABLE", "TuningStore", "cache_dir",
           "split_k_allowed", "store_file_name", "tuning_pinned", "tuning_store"]

CACHE_DIR_VARIABLE = "LORA_ENSEMBLE_CACHE_DIR"
PIN_VARIABLE = "LORA_ENSEMBLE_TRITON_AUTOTUNE"
# Set to 0, the stacked Triton kernel never splits K (no split-K tiling is offered; read when a launch is
# first planned, and by auto's cost model): a way out should the split-K kernel misbehave or lose on a GPU.
SPLIT_K_VARIABLE = "LORA_ENSEMBLE_TRITON_SPLIT_K"
FORMAT = 1
_SECTIONS = ("triton_configs", "auto")


# The pin variable as os.environ stores it (bytes on POSIX): each Triton launch reads it, and
# os.environ.get costs ~1 µs a call (the key's encoding and the value's decoding) where a lookup in
# the mapping os.environ keeps up to date costs ~0.05 µs.
_ENVIRON = getattr(os.environ, "_data", None)
if _ENVIRON is not None:
    _PIN_KEY, _PINNED_VALUE = os.environ.encodekey(PIN_VARIABLE), os.environ.encodevalue("0")


def tuning_pinned() -> bool:
    """Whether tuning is pinned: ``LORA_ENSEMBLE_TRITON_AUTOTUNE=0`` or deterministic algorithms on.
    Then nothing is timed and nothing stored is read: each Triton kernel runs the cost model's first
    config and ``auto`` follows the cost model, so new processes compute the same bits."""
    if _ENVIRON is not None:
        pinned = _ENVIRON.get(_PIN_KEY) == _PINNED_VALUE
    else:
        pinned = os.environ.get(PIN_VARIABLE, "1") == "0"
    return pinned or torch.are_deterministic_algorithms_enabled()


def split_k_allowed() -> bool:
    """Whether the stacked Triton kernel may split K (``LORA_ENSEMBLE_TRITON_SPLIT_K`` is not ``0``; read
    once a launch key, when it is planned)."""
    return os.environ.get(SPLIT_K_VARIABLE) != "0"


def cache_dir() -> Path | None:
    """The folder of the tuning files, or None when ``LORA_ENSEMBLE_CACHE_DIR`` is set empty."""
    folder = os.environ.get(CACHE_DIR_VARIABLE)
    if folder is not None:
        return Path(folder).expanduser() if folder else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lora_ensemble"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "unknown"


def store_file_name(device_name: str, torch_version: str, triton_version: str) -> str:
    """``tuning-<device>-torch<version>-triton<version>.json``, with anything but letters, digits and
    dots in the parts turned into ``-``."""
    return f"tuning-{_slug(device_name)}-torch{_slug(torch_version)}-triton{_slug(triton_version)}.json"


def _triton_version() -> str:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _empty(device: str, torch_version: str, triton_version: str) -> dict[str, Any]:
    return {"format": FORMAT, "device": device, "torch": torch_version, "triton": triton_version,
            **{section: {} for section in _SECTIONS}}


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive use of ``path`` (a lock file next to the table) among processes, where the platform
    has ``fcntl``; elsewhere the atomic replace alone (a concurrent write may then lose an entry)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _put(node: dict[str, Any], keys: tuple[str, ...], entry: dict[str, Any]) -> None:
    """``node[k0][k1]...[kn] = entry``, replacing whatever is not an object on the way."""
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = entry


class TuningStore:
    """The tuning results of one device name and software stack, backed by one JSON file (or none)."""

    def __init__(self, path: Path | None, device: str, torch_version: str, triton_version: str) -> None:
        self.path = path
        self.device, self.torch_version, self.triton_version = device, torch_version, triton_version
        self._data: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def _read_file(self) -> dict[str, Any] | None:
        """The file's table when it is a valid one of this stack, None when there is none; a damaged
        or foreign file gives a warning and None."""
        if self.path is None or not self.path.exists():
            return None
        try:
            data = json.loads(self.path.read_text())
            problem = None
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                problem = f"not a format-{FORMAT} tuning table"
            elif (data.get("device"), data.get("torch"), data.get("triton")) != (
                    self.device, self.torch_version, self.triton_version):
                problem = "written for another device or software stack"
            elif not all(isinstance(data.get(section), dict) for section in _SECTIONS):
                problem = f"its sections {_SECTIONS} are not all objects"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            warnings.warn(f"lora_ensemble: ignoring the tuning file {self.path} ({problem}); it is rewritten on "
                          "the next tuning result", RuntimeWarning, stacklevel=3)
            return None
        return data

    def _table(self) -> dict[str, Any]:
        if self._data is None:
            self._data = self._read_file() or _empty(self.device, self.torch_version, self.triton_version)
        return self._data

    def _lookup(self, section: str, *keys: str) -> dict[str, Any] | None:
        entry: Any = self._table()[section]
        for key in keys:
            entry = entry.get(key) if isinstance(entry, dict) else None
        return entry if isinstance(entry, dict) else None

    def _record(self, section: str, keys: tuple[str, ...], entry: dict[str, Any]) -> None:
        with self._lock:
            _put(self._table()[section], keys, entry)
            self._write(section, keys, entry)

    def _write(self, section: str, keys: tuple[str, ...], entry: dict[str, Any]) -> None:
        """Merge ``entry`` into what the file holds now and replace the file atomically."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.path.with_name(self.path.name + ".lock")):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a damaged file was reported when it was first read
                    current = self._read_file() or _empty(self.device, self.torch_version, self.triton_version)
                _put(current[section], keys, entry)
                handle, temporary = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
                try:
                    with os.fdopen(handle, "w") as f:
                        json.dump(current, f, indent=1, sort_keys=True)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(temporary, self.path)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(temporary)
        except OSError as exc:
            warnings.warn(f"lora_ensemble: cannot write the tuning file {self.path} ({exc}); results are kept in "
                          "this process only", RuntimeWarning, stacklevel=4)
            self.path = None

    def summary(self) -> str:
        """How many results the table holds, e.g. ``"3 auto choices, 5 Triton winners"``."""
        table = self._table()
        winners = sum(len(keys) for keys in table["triton_configs"].values() if isinstance(keys, dict))
        return f"{len(table['auto'])} auto choices, {winners} Triton winners"

    def triton_config(self, kernel: str, key: str) -> dict[str, Any] | None:
        """The stored winner of ``kernel`` for autotune ``key``: ``{"kwargs", "num_warps",
        "num_stages", ...}``, or None."""
        return self._lookup("triton_configs", kernel, key)

    def record_triton_config(self, kernel: str, key: str, kwargs: dict[str, int], num_warps: int, num_stages: int,
                             timings_us: dict[str, float] | None = None) -> None:
        """Store the winner of ``kernel`` for ``key`` (and the timings it won by, config name -> µs)."""
        entry: dict[str, Any] = {"kwargs": dict(kwargs), "num_warps": num_warps, "num_stages": num_stages}
        if timings_us:
            entry["timings_us"] = dict(timings_us)
        self._record("triton_configs", (kernel, key), entry)

    def auto_choice(self, shape_class: str) -> dict[str, Any] | None:
        """``{"backend": ..., "times_us": {backend: µs}}`` measured for ``shape_class``, or None."""
        return self._lookup("auto", shape_class)

    def record_auto_choice(self, shape_class: str, backend: str, times_us: dict[str, float]) -> None:
        """Store ``auto``'s measured choice for ``shape_class`` and the times it chose by."""
        self._record("auto", (shape_class,), {"backend": backend, "times_us": dict(times_us)})


@functools.cache
def _store(device_name: str, folder: Path | None) -> TuningStore:
    torch_version, triton_version = torch.__version__, _triton_version()
    path = folder / store_file_name(device_name, torch_version, triton_version) if folder is not None else None
    return TuningStore(path, device_name, torch_version, triton_version)


def tuning_store(device: torch.device) -> TuningStore:
    """The store of ``device``'s GPU model (one per name, folder and process; CPU devices share one
    named "cpu")."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return _store(name, cache_dir())
