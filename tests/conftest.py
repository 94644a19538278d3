"""Test set-up: Triton runs under its CPU interpreter when no GPU is present, and every tensor the
library allocates uninitialised starts as NaN.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at conftest import.
On a machine with a GPU the kernels run for real (set TRITON_INTERPRET=1 yourself to force the
interpreter there).

Poisoned allocations (as flash-linear-attention's tests poison memory): inside every test, the
modules of ``lora_ensemble`` (its kernels' launchers included) see a ``torch`` whose ``empty``,
``empty_like`` and ``empty_strided`` return floating tensors filled with NaN. An output element
that a kernel forgets to store then stays NaN and fails the comparison with the reference, where
fresh memory would often have held zeros or a stale correct value by chance. ``torch`` itself,
the tests' own tensors and allocations made in C++ (the CUDA extension's ``at::empty``) are left
alone; the CUDA kernels' host-emulation tests surround their buffers with NaN themselves.

Under the interpreter every load, store and atomic of every kernel is also checked to stay inside
its launch's tensor arguments (tests/interpreter_memcheck.py, the interpreter's memcheck).
"""

import functools
import os
import sys
import types

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        from .interpreter_memcheck import install as install_interpreter_memcheck
    except ImportError:  # no triton: nothing is interpreted
        pass
    else:
        install_interpreter_memcheck()

# The allocators whose memory is left uninitialised; ``Tensor.new_empty`` is not patched (it is a
# method of every tensor, so it cannot be changed for one module): the library uses it for fake
# (meta) outputs and empty placeholders only.
POISONED_FACTORIES = ("empty", "empty_like", "empty_strided")


def poisoned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` filled with NaN when it is floating point (integer and bool tensors as they are)."""
    if tensor.is_floating_point() or tensor.is_complex():
        with torch.no_grad():
            tensor.fill_(float("nan"))
    return tensor


def _poisoning(factory):
    @functools.wraps(factory)
    def allocate(*args, **kwargs):
        return poisoned(factory(*args, **kwargs))
    return allocate


@functools.cache
def poisoned_torch() -> types.ModuleType:
    """A stand-in for the ``torch`` module: the same attributes (lazily loaded submodules too), except
    that :data:`POISONED_FACTORIES` return NaN-filled floating tensors."""
    view = types.ModuleType(torch.__name__, torch.__doc__)
    view.__dict__.update(torch.__dict__)
    view.__getattr__ = functools.partial(getattr, torch)  # torch's lazily imported submodules
    for name in POISONED_FACTORIES:
        setattr(view, name, _poisoning(getattr(torch, name)))
    return view


def _library_modules() -> list[types.ModuleType]:
    """Every loaded module of the package whose global ``torch`` is the torch module. The Triton
    backend is imported first (when it can be), so that its launchers are patched from the first
    test on."""
    try:
        import lora_ensemble.backend_triton  # noqa: F401
    except ImportError:
        pass
    return [module for name, module in list(sys.modules.items())
            if (name == "lora_ensemble" or name.startswith("lora_ensemble.")) and module is not None
            and getattr(module, "torch", None) is torch]


@pytest.fixture(autouse=True)
def _poison_library_allocations(monkeypatch: pytest.MonkeyPatch) -> None:
    view = poisoned_torch()
    for module in _library_modules():
        monkeypatch.setattr(module, "torch", view)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_auto(monkeypatch, tmp_path):
    """A new process's state of ``backend="auto"``: no decisions, an empty tuning folder, nothing pinned."""
    from lora_ensemble import auto_backend, functional, tuning_store

    monkeypatch.setenv(tuning_store.CACHE_DIR_VARIABLE, str(tmp_path))
    monkeypatch.delenv(auto_backend.PIN_VARIABLE, raising=False)
    monkeypatch.delenv(auto_backend.MEASURE_VARIABLE, raising=False)

    def reset() -> None:
        auto_backend._CHOICES.clear()
        auto_backend._DECISIONS.clear()
        tuning_store._store.cache_clear()
        functional._resolve_cached.cache_clear()

    reset()
    yield reset
    reset()


@pytest.fixture
def two_candidates(fresh_auto, monkeypatch):
    """``auto`` on the CPU chooses between the Triton interpreter and the composite."""
    from lora_ensemble import auto_backend, backends

    def candidates(device, dtype):
        return ("triton", "torch") if dtype in backends.FUSED_DTYPES else ("torch",)

    monkeypatch.setattr(backends, "auto_candidates", candidates)
    monkeypatch.setattr(auto_backend, "auto_candidates", candidates)
    return fresh_auto


def _set_tf32(allowed: bool):
    """Set PyTorch's fp32 matmul TF32 switch; return a function that restores it."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        before = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if allowed else "ieee"
        return lambda: setattr(matmul, "fp32_precision", before)
    before = matmul.allow_tf32
    matmul.allow_tf32 = allowed
    return lambda: setattr(matmul, "allow_tf32", before)


@pytest.fixture
def tf32_matmuls():
    """PyTorch allows TF32 for fp32 matmuls for the duration of a test."""
    restore = _set_tf32(True)
    yield
    restore()


@pytest.fixture
def fp32_matmuls():
    """PyTorch asks for full fp32 matmuls for the duration of a test."""
    restore = _set_tf32(False)
    yield
    restore()
