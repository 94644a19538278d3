"""A bounds check of every memory access the Triton interpreter runs (``TRITON_INTERPRET=1``).

On a GPU, ``compute-sanitizer --tool memcheck`` finds a kernel that reads or writes outside its
tensors; under the CPU interpreter such an access reads or corrupts the test process's own heap
(a wrong value by chance, or a crash much later: "double free or corruption"). :func:`install`
makes the interpreter check, before each masked load, store and atomic, that every address the
mask lets through lies inside the storage of one of the launch's tensor arguments, and raise
:class:`OutOfBoundsAccess` naming the kernel, the program and the access otherwise. tests/conftest.py
installs it for the whole suite whenever the interpreter runs.
"""

from __future__ import annotations

import numpy as np
from triton.runtime import interpreter

__all__ = ["OutOfBoundsAccess", "install"]


class OutOfBoundsAccess(RuntimeError):
    """A kernel under the interpreter accessed memory outside every tensor argument of its launch."""


# The storages [start, end) of the running launch's tensor arguments, and the kernel's name.
_launch: dict = {"ranges": np.zeros((0, 2), dtype=np.uint64), "kernel": "?"}


def _check(access: str, pointers, mask, element_size: int) -> None:
    addresses = np.asarray(pointers.data).astype(np.uint64)
    if mask is not None:
        addresses = addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)]
    if addresses.size == 0:
        return
    ranges = _launch["ranges"]
    inside = ((addresses[:, None] >= ranges[None, :, 0])
              & (addresses[:, None] + np.uint64(element_size) <= ranges[None, :, 1])).any(axis=1)
    if not inside.all():
        outside = addresses[~inside]
        raise OutOfBoundsAccess(
            f"{access} of {outside.size} element(s) outside every tensor argument of {_launch['kernel']} "
            f"(program {tuple(interpreter.interpreter_builder.grid_idx)}): first address {int(outside[0]):#x}, "
            f"argument storages {[(hex(int(a)), int(b - a)) for a, b in ranges]} (start, bytes)")


def install() -> None:
    """Check every interpreted load, store and atomic of this process from now on (idempotent)."""
    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    if getattr(builder, "_lora_ensemble_memcheck", False):
        return
    init_args, load, store, atomic = (executor._init_args_hst, builder.create_masked_load,
                                      builder.create_masked_store, builder.create_atomic_rmw)

    def checked_init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        storages = [t.untyped_storage() for t in (*args_hst, *kwargs_hst.values()) if hasattr(t, "untyped_storage")]
        _launch["ranges"] = np.array([(s.data_ptr(), s.data_ptr() + s.nbytes()) for s in storages],
                                     dtype=np.uint64).reshape(-1, 2)
        _launch["kernel"] = getattr(self.fn, "__name__", repr(self.fn))
        return args_hst, kwargs_hst

    def checked_load(self, ptrs, mask, other, *rest):
        _check("load", ptrs, mask, np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize)
        return load(self, ptrs, mask, other, *rest)

    def checked_store(self, ptrs, value, mask, *rest):
        _check("store", ptrs, mask, np.asarray(value.data).dtype.itemsize)
        return store(self, ptrs, value, mask, *rest)

    def checked_atomic(self, op, ptr, value, mask, *rest):
        _check("atomic", ptr, mask, np.asarray(value.data).dtype.itemsize)
        return atomic(self, op, ptr, value, mask, *rest)

    executor._init_args_hst = checked_init_args
    builder.create_masked_load, builder.create_masked_store = checked_load, checked_store
    builder.create_atomic_rmw = checked_atomic
    builder._lora_ensemble_memcheck = True
