"""The NaN-poisoned allocations of conftest.py catch an output tile that a kernel never stores.

A kernel that skips a tile leaves whatever the output's fresh memory held; the autouse fixture makes
that NaN for every tensor the library allocates, so the comparison with the float64 reference fails
instead of passing on zeroed memory by luck. Here a Triton launch is made to skip its last program
(the launcher and the kernel are untouched: the kernel object is wrapped so that its grid has one
program fewer along axis 0), and the poisoned output must show it.
"""

from __future__ import annotations

import pytest
import torch

import lora_ensemble
from lora_ensemble import available_backends, fused_lora_ensemble_linear

from .conftest import POISONED_FACTORIES
from .utils import check_against_reference, make_inputs

pytestmark = pytest.mark.skipif("triton" not in available_backends("cpu"),
                                reason="needs the Triton interpreter (TRITON_INTERPRET=1, no GPU)")


class LastProgramSkipped:
    """A Triton kernel launched with one program fewer along grid axis 0: the tile of the last
    program is never computed nor stored."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.grids: list[tuple[int, ...]] = []

    def __getattr__(self, name: str):
        return getattr(self.kernel, name)  # the launcher reads the kernel's argument names

    def __getitem__(self, grid):
        def fewer(meta):
            full = tuple(grid(meta) if callable(grid) else grid)
            assert full[0] >= 2, f"grid {full}: the test shape must give axis 0 two programs or more"
            self.grids.append(full)
            return (full[0] - 1, *full[1:])
        return self.kernel[fewer]


def test_the_library_sees_poisoned_allocators_and_torch_does_not() -> None:
    from lora_ensemble.kernels import fused_lora_gemm

    for name in POISONED_FACTORIES:
        assert getattr(fused_lora_gemm.torch, name) is not getattr(torch, name), name
    assert torch.isnan(fused_lora_gemm.torch.empty(3, 4)).all()
    assert torch.isnan(lora_ensemble.ops.torch.empty_like(torch.ones(2))).all()
    assert fused_lora_gemm.torch.empty(3, dtype=torch.int32).shape == (3,)  # integers are left as they are
    assert fused_lora_gemm.torch.matmul is torch.matmul and fused_lora_gemm.torch.nn is torch.nn


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_a_skipped_output_tile_fails_against_the_reference(monkeypatch: pytest.MonkeyPatch, shared: bool) -> None:
    from lora_ensemble.kernels import fused_lora_gemm

    # Two row tiles and several column tiles per member: axis 0 of the grid has programs to spare.
    inp = make_inputs(2, 130, 20, 70, 3, shared_input=shared, requires_grad=())
    check_against_reference(inp, "triton")  # every tile stored: matches

    kernel = fused_lora_gemm._SHARED if shared else fused_lora_gemm._STACKED
    skipping = LastProgramSkipped(kernel.fn)
    monkeypatch.setattr(kernel, "fn", skipping)
    monkeypatch.setattr(kernel, "bound", {})  # no launch bound before the wrapping
    out = fused_lora_ensemble_linear(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling,
                                     shared_input=shared, backend="triton")
    assert skipping.grids, "the wrapped kernel was not launched"
    unwritten = torch.isnan(out)
    assert unwritten.any(), "the skipped tile left no NaN: the output was not poisoned"
    assert not unwritten.all(), "every element is NaN: more than one tile went missing"
    with pytest.raises(AssertionError, match="NaN in result: [1-9]"):
        check_against_reference(inp, "triton")
