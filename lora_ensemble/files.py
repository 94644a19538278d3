"""Reading the saved files (this package's members, peft's adapters) with errors that name the file and
what is wrong in it: not JSON, not a JSON object, a key missing or of the wrong type, a weights file
that is truncated, random, or a pickle where safetensors were expected. No pickle is ever loaded except
through ``torch.load(weights_only=True)``, which refuses anything but tensors and containers.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._optional import optional_dependency

with optional_dependency("lora_ensemble.files"):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

__all__ = ["MISSING", "check_field", "read_json_object", "read_pickled_tensors", "read_safetensors"]


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or JSON that is not an object.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(value).__name__}")
    return value


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


# What check_field returns for an optional key that is absent.
MISSING = _Missing()


_NAMES = {int: "an int", float: "a number", str: "a string", bool: "true/false", list: "a list", dict: "an object",
          type(None): "null"}
_PLURALS = {int: "ints", float: "numbers", str: "strings"}


def _type_names(kinds: tuple[type, ...], items: type | None) -> str:
    """``(str, list), str`` -> ``"a string or a list of strings"``."""
    return " or ".join(f"a list of {_PLURALS[items]}" if kind is list and items is not None
                       else _NAMES.get(kind, kind.__name__) for kind in kinds)


def check_field(path: Path, config: dict[str, Any], key: str, kinds: tuple[type, ...], *,
                required: bool = True, items: type | None = None, where: str = "") -> Any:
    """``config[key]`` when it is of one of ``kinds`` (``float`` admits ints; ``int`` and ``float`` refuse
    booleans) and, for a list, every item of type ``items``; else a ``ValueError`` naming ``path`` and the
    key (``where``: the key's parent, e.g. ``"base."``). An absent key is an error when ``required``, else
    :data:`MISSING`."""
    if key not in config:
        if required:
            raise ValueError(f"{path}: {where}{key} is missing")
        return MISSING
    value = config[key]
    allowed = kinds + ((int,) if float in kinds else ())
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in kinds)
    if ok and items is not None and isinstance(value, list):
        ok = all(isinstance(item, items) and not isinstance(item, bool) for item in value)
    if not ok:
        raise ValueError(f"{path}: {where}{key} must be {_type_names(kinds, items)}, got {value!r}")
    return value


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file safetensors cannot read (truncated, random bytes, a pickle).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or of another format): {exc}") from None


def read_pickled_tensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a ``torch.save`` file, read with ``weights_only=True`` (no code runs).

    Raises:
        ValueError: a file that is not one (truncated, random bytes, a pickle of anything but tensors).
    """
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, SafetensorError) as exc:
        raise ValueError(f"{path} is not a readable torch.save file of tensors (truncated, of another format, or "
                         f"holding objects that weights_only refuses): {str(exc).splitlines()[0]}") from None
    if not (isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items())):
        raise ValueError(f"{path} must hold a dict of named tensors, got a {type(value).__name__}")
    return value
