"""Triton's once-a-process cache key, hashed on a thread while the model is still being built.

The first Triton compile or disk-cache load of a process computes ``triton.runtime.cache.triton_key()``:
a SHA-256 of Triton's own installation, libtriton (~400-500 MB) included; 0.36-0.50 s on this
project's 2-core CPU, most of a second process's first fused call when every binary is already in
Triton's disk cache and every winner in the tuning file. ``hashlib`` releases the GIL while it
hashes, so a thread computes the key beside the rest of the model's building and moving and the
data's loading, started as soon as a LoRA-Ensemble layer whose backend may run Triton (``"triton"``
or ``"auto"``) has its factors

- on a CUDA device: built there, wrapped around a layer there, or moved there (``.to``, ``.cuda``), or
- on the CPU of a machine where NVML sees a GPU (``CUDA_VISIBLE_DEVICES`` applied): a model wrapped
  there is usually moved to the GPU next, and starting before the move overlaps CUDA's initialisation
  and the weights' copy too.

The launcher's first launch of a new key (kernels/launcher.py) waits for that thread instead of
hashing a second time (``triton_key``'s ``functools.lru_cache`` would let two threads compute it at
once). Once per process; never under the interpreter. CUDA itself is never asked (NVML is, which
initialises no CUDA context: no fork is poisoned), and nothing changes what Triton computes or caches:
the thread calls Triton's own function, whose result Triton's own cache of it keeps.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable

import torch

from .backends import triton_interpreting

__all__ = ["hash_wait_s", "start_hashing", "wait_for_hash"]

_lock = threading.Lock()
_started = False
_thread: threading.Thread | None = None
_waited_s = 0.0  # how long the launchers waited for the thread, in all


def start_hashing(backend: str, device: torch.device) -> None:
    """Start hashing Triton's installation on a daemon thread, once per process, where ``backend``
    (``"auto"``, ``"triton"``, ...) may run Triton kernels and the factors are on ``device`` (see the
    module docstring); else do nothing. A Triton without the function (or none installed) is left to
    its own first compile."""
    global _started, _thread
    if _started or backend not in ("auto", "triton"):
        return
    if device.type != "cuda" and not (device.type == "cpu" and _gpus_seen_by_nvml() > 0):
        return
    with _lock:
        if _started:
            return
        _started = True
        if triton_interpreting():
            return
        try:
            from triton.runtime.cache import triton_key
        except ImportError:
            return
        _thread = threading.Thread(target=_hash, args=(triton_key,), name="lora_ensemble-triton-key", daemon=True)
        _thread.start()


@functools.cache
def _gpus_seen_by_nvml() -> int:
    """The GPUs NVML sees, as PyTorch's fork-safe count gives them (``CUDA_VISIBLE_DEVICES`` applied;
    CUDA not initialised); -1 where it cannot tell (no NVML, MIG, a ROCm build, an older PyTorch)."""
    count = getattr(torch.cuda, "_device_count_nvml", None)
    if count is None or torch.version.cuda is None:
        return -1
    try:
        return count()
    except Exception:  # noqa: BLE001  (NVML's failures are PyTorch's to report where CUDA is used)
        return -1


def _hash(triton_key: Callable[[], str]) -> None:
    # A failure is left to Triton's own call at the first compile, which raises it where it belongs.
    with contextlib.suppress(Exception):
        triton_key()


def wait_for_hash() -> None:
    """Wait for :func:`start_hashing`'s thread, if one runs (then Triton's key is in its cache)."""
    global _waited_s
    thread = _thread
    if thread is not None and thread.is_alive():
        start = time.perf_counter()
        thread.join()
        _waited_s += time.perf_counter() - start


def hash_wait_s() -> float:
    """Seconds this process's fused calls waited for the hashing thread, in all (what of the hash the
    model's building did not cover)."""
    return _waited_s
