"""Backend registry: which implementations of the op exist here, and which one ``auto`` picks.

A backend is a module with three functions (:class:`Backend`), all taking tensors of one dtype
(``N`` members, ``M`` rows per member, ``d`` in, ``k`` out, ``r`` rank); ``x``, ``lora_A``,
``lora_B`` and ``grad_out`` are contiguous, ``weight`` may be any strided view (the ``cuda``
backend is handed a contiguous one). The rank-``r`` intermediates ``xa`` and ``dyb`` are kept in the
accumulation dtype (:func:`accum_dtype`: float32, float64 for float64 inputs, which only the
``torch`` backend takes)::

    forward(x, weight, bias, lora_A, lora_B, scaling, shared_input, base=None) -> (out, xa)
        x [N, M, d] (shared_input: [M, d]), weight [k, d] | None, bias [k] | None,
        lora_A [N, r, d], lora_B [N, k, r], base [N, M, k] (shared_input: [M, k]) | None
        out = x @ W0^T (when weight) + bias + base + s (x @ A^T) @ B^T  [N, M, k] in x.dtype
        xa = x @ A^T  [N, M, r] accum dtype (saved for backward)
    backward_dx(grad_out, weight, lora_A, lora_B, scaling, shared_input) -> (dx, dyb)
        grad_out [N, M, k]
        dx = dy @ W0 (when weight) + s * (dy @ B) @ A   [N, M, d] (shared_input: [M, d], summed
        over members);  dyb = dy @ B  [N, M, r] accum dtype
    backward_lora(grad_out, x, xa, dyb, scaling, shared_input) -> (dA, dB)
        dA = s * dyb^T @ x  [N, r, d];  dB = s * dy^T @ xa  [N, k, r];  both in x.dtype

``weight=None`` with a ``base`` is the low-rank update over a base layer the kernels cannot read (a
quantized linear): its output ``base`` is computed by the layer itself and added here.

Backends are imported lazily: nothing here touches CUDA, Triton or the compiled extension at
import time.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "BACKENDS",
    "Backend",
    "FUSED_DTYPES",
    "accum_dtype",
    "auto_candidates",
    "available_backends",
    "get_backend",
    "in_dtype",
    "resolve_backend",
    "unavailable_reason",
]

BACKENDS: tuple[str, ...] = ("torch", "triton", "cuda")
_MODULES = {
    "torch": "lora_ensemble.backend_torch",
    "triton": "lora_ensemble.backend_triton",
    "cuda": "lora_ensemble.backend_cuda",
}
# The dtypes the fused (triton, cuda) backends take; float64 runs on the torch backend only.
FUSED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
# For CUDA tensors, ``auto`` chooses per shape among the available ones of these (lora_ensemble.auto_backend);
# without a shape it names the first.
_AUTO_CUDA_ORDER: tuple[str, ...] = ("triton", "cuda", "torch")


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the op's rank-``r`` intermediates for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def in_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``: ``t`` itself when it already is (``Tensor.to`` costs ~0.7 µs of host time
    even then, a tenth of a small layer's eager call)."""
    return t if t.dtype == dtype else t.to(dtype)


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run here, or None: triton < 3.7 calls ``int()`` on
    one-element arrays (``runtime/interpreter.py``, ``tensor.__index__``), which NumPy >= 2.4
    refuses, so every kernel loop over a runtime bound fails."""
    import numpy
    import triton

    def major_minor(version: str) -> tuple[int, int]:
        major, minor = version.split(".")[:2]
        return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)

    if major_minor(triton.__version__) < (3, 7) and major_minor(numpy.__version__) >= (2, 4):
        return (f"the Triton {triton.__version__} interpreter fails with NumPy {numpy.__version__}; "
                "install numpy<2.4 or triton>=3.7 to run the Triton kernels on the CPU")
    return None


def unavailable_reason(name: str, device: torch.device | str | None = None) -> str | None:
    """Why backend ``name`` cannot run on ``device`` here, or None when it can.

    ``device=None`` asks whether the backend is usable on some device of this machine.
    """
    if name not in _MODULES:
        return f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}"
    dev = torch.device(device) if device is not None else None
    if name == "torch":
        return None
    try:
        importlib.import_module(_MODULES[name])
    except (ImportError, OSError, RuntimeError) as exc:
        return f"backend {name!r} failed to load: {exc}"
    if name == "triton":
        if dev is None:
            if torch.cuda.is_available():
                return None
            if triton_interpreting():
                return _interpreter_problem()
            return "backend 'triton' needs a CUDA device, or TRITON_INTERPRET=1 to run on the CPU"
        if dev.type == "cuda":
            return None
        if dev.type == "cpu" and triton_interpreting():
            return _interpreter_problem()
        return f"backend 'triton' cannot run on device {dev} (CUDA, or CPU with TRITON_INTERPRET=1)"
    # cuda
    if dev is not None and dev.type != "cuda":
        return f"backend 'cuda' runs on CUDA tensors only, got device {dev}"
    if dev is None and not torch.cuda.is_available():
        return "backend 'cuda' needs a CUDA device"
    if dev is not None:
        return get_backend("cuda").device_problem(dev.index if dev.index is not None else torch.cuda.current_device())
    return None


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run on ``device`` (any device of this machine if None)."""
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


def auto_candidates(device: torch.device | str, dtype: torch.dtype) -> tuple[str, ...]:
    """The backends ``auto`` chooses among for tensors on ``device`` in ``dtype``: on CUDA in a fused
    dtype every available one of ``triton``, ``cuda`` and ``torch`` (the composite is always one);
    anywhere else ``torch`` alone."""
    dev = torch.device(device)
    if dev.type != "cuda" or dtype not in FUSED_DTYPES:
        return ("torch",)
    return tuple(b for b in _AUTO_CUDA_ORDER if unavailable_reason(b, dev) is None)


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype = torch.float32,
                    defer_auto: bool = False) -> str:
    """Turn ``auto`` into a concrete backend for ``device`` and ``dtype``; check an explicit one is usable.

    ``auto`` gives its only candidate (:func:`auto_candidates`) where it has one. Where it has several
    the choice depends on the call's shape (:func:`lora_ensemble.auto_backend.auto_backend`): then
    ``defer_auto=True`` returns ``"auto"`` itself, and ``defer_auto=False`` the first candidate (the
    fused backend ``auto`` prefers where the fused kernels win).

    Raises:
        ValueError: unknown backend name.
        TypeError: a fused backend asked for a dtype it does not take (float64).
        RuntimeError: the backend exists but cannot run on ``device`` here (the reason is given).
    """
    dev = torch.device(device)
    if name == "auto":
        candidates = auto_candidates(dev, dtype)
        return "auto" if defer_auto and len(candidates) > 1 else candidates[0]
    if name not in _MODULES:
        raise ValueError(f"backend: unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    if name != "torch" and dtype not in FUSED_DTYPES:
        raise TypeError(f"backend={name!r} takes dtypes {FUSED_DTYPES}, got {dtype}; use backend='torch'")
    reason = unavailable_reason(name, dev)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} is not available: {reason}")
    return name


class Backend(Protocol):
    """The contract every backend module implements (shapes in the module docstring)."""

    def forward(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, shared_input: bool, base: Tensor | None = None) -> tuple[Tensor, Tensor]: ...

    def backward_dx(self, grad_out: Tensor, weight: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float,
                    shared_input: bool) -> tuple[Tensor, Tensor]: ...

    def backward_lora(self, grad_out: Tensor, x: Tensor, xa: Tensor, dyb: Tensor, scaling: float,
                      shared_input: bool) -> tuple[Tensor, Tensor]: ...


_LOADED: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The module implementing concrete backend ``name`` (see :class:`Backend`), imported once."""
    backend = _LOADED.get(name)
    if backend is None:
        backend = _LOADED[name] = importlib.import_module(_MODULES[name])
    return backend
