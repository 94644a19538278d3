"""The interpreter's memcheck (tests/interpreter_memcheck.py) that the whole suite runs under: it
lets every in-bounds access through and stops one past a tensor's storage before it happens."""

import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from .interpreter_memcheck import OutOfBoundsAccess  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the CPU interpreter")


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, extra, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    values = tl.load(src_ptr + offsets, mask=offsets < n + extra, other=0.0)
    tl.store(dst_ptr + offsets, values, mask=offsets < n)


def test_in_bounds_accesses_pass_and_masked_off_addresses_are_not_checked():
    src = torch.randn(5)
    dst = torch.full((5,), float("nan"))
    _copy_kernel[(1,)](src, dst, 5, 0, BLOCK=8)  # lanes 5..7 masked off
    assert torch.equal(dst, src)


def test_a_load_past_the_storage_is_stopped_naming_the_kernel():
    src = torch.randn(64)[:5]  # a view: its storage holds 64 elements, so reading up to 64 is in bounds
    dst = torch.zeros(5)
    _copy_kernel[(1,)](src, dst, 5, 3, BLOCK=8)
    src = torch.randn(5)
    with pytest.raises(Exception, match=f"{OutOfBoundsAccess.__name__}.*load of 3 element.* of _copy_kernel"):
        _copy_kernel[(1,)](src, dst, 5, 3, BLOCK=8)


def test_a_store_past_the_storage_is_stopped_before_it_writes():
    src = torch.randn(8)
    dst = torch.zeros(8)[:5].clone()  # a storage of exactly 5 elements
    with pytest.raises(Exception, match=f"{OutOfBoundsAccess.__name__}.*store of 3 element"):
        _copy_kernel[(1,)](src, dst, 8, 0, BLOCK=8)
    assert torch.equal(dst, torch.zeros(5))  # nothing was written, in bounds or not
