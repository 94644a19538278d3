"""The ``cuda`` backend (hand-written CUDA C++ kernels in csrc/cuda/).

Without a GPU: the compiled extension registers CUDA kernels for its three ops, their schemas and
fake impls pass ``opcheck`` on meta tensors, and importing the package neither loads the extension
nor initialises CUDA. The kernels' own source also runs on the CPU under a host emulation of the
CUDA features they use (csrc/cuda/host_emulation.cuh: a thread per CUDA thread, barriers, late
cp.async copies, WMMA tiles with their alignment rules), built with g++, against the float64
reference, with NaN guard zones around every buffer to catch reads and writes past the edges.
The entry points plan and fill the kernels' parameters with the same make_params.cuh as the
extension (tests/cuda_emulation.py); the cases cover every row-tile regime of the planner: decode
(one 16-row tile over many members), tiles straddling member boundaries, 64-row tiles, tiles of whole
members at high rank, shared-input passes and member groups, and split-K in any CTA arrival order.
With a GPU (``@pytest.mark.gpu``): every output against the float64 reference
over odd shapes, both layouts, three dtypes and ranks 1..128, the by-products ``xa`` / ``dyb``,
input errors, and CUDA-graph capture (also of split-K).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_ensemble
from lora_ensemble.reference import lora_ensemble_reference, lora_ensemble_reference_backward

from . import cuda_emulation
from .cuda_emulation import Guarded
from .utils import TOLERANCES, assert_close_named, check_against_reference, make_inputs

OPS = ("cuda_forward", "cuda_backward_dx", "cuda_backward_lora")

_EXTENSION_EXPECTED = torch.version.cuda is not None and os.environ.get("LORA_ENSEMBLE_SKIP_CUDA_BUILD", "0") != "1"
needs_extension = pytest.mark.skipif(
    not _EXTENSION_EXPECTED, reason="the CUDA extension is not built (CPU torch or LORA_ENSEMBLE_SKIP_CUDA_BUILD=1)")


@pytest.fixture(scope="module")
def backend_cuda():
    import lora_ensemble.backend_cuda as module

    return module


@needs_extension
def test_ops_have_cuda_kernels(backend_cuda):
    assert backend_cuda.has_cuda_kernels()
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_ensemble::{op}", "CUDA"), op


def _default_arch_list() -> str:
    setup_py = (Path(__file__).resolve().parent.parent / "setup.py").read_text()
    return re.search(r'^DEFAULT_ARCH_LIST = "([^"]+)"', setup_py, re.MULTILINE).group(1)


def test_default_build_carries_ptx_for_newer_gpus():
    """SASS runs only on its own major architecture: without PTX, a GPU newer than the last listed
    arch (Blackwell for an 8.0;9.0 build) has no kernel image at all. The default arch list embeds
    compute_90 PTX, which the driver compiles for any later GPU."""
    assert _default_arch_list().split(";")[-1].endswith("+PTX"), _default_arch_list()


@needs_extension
def test_build_records_its_archs(backend_cuda):
    """``build_archs()`` is the arch list the extension was compiled for (the default unless
    TORCH_CUDA_ARCH_LIST is set); with cuobjdump at hand, the binary holds PTX exactly when that
    list asks for it."""
    archs = backend_cuda.build_archs()
    assert archs and all(re.fullmatch(r"\d+\.\d+a?(\+PTX)?", arch) for arch in archs), archs
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        assert archs == _default_arch_list().split(";")
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump is not None:
        listing = subprocess.run([cuobjdump, "--list-ptx", backend_cuda._C.__file__], capture_output=True,
                                 text=True, timeout=120)
        assert (".ptx" in listing.stdout) == any(arch.endswith("+PTX") for arch in archs), (archs, listing.stdout)


@pytest.mark.gpu
@needs_extension
def test_device_has_kernel_image(backend_cuda):
    """On the GPU at hand (sm_80 or later) the extension finds its kernels; the check is cached."""
    index = torch.cuda.current_device()
    assert backend_cuda.device_problem(index) is None
    assert "cuda" in lora_ensemble.available_backends(torch.device("cuda", index))


def _meta_args(op: str, shared_input: bool, with_bias: bool = True) -> tuple:
    n, m, d, k, r = 3, 7, 24, 10, 5
    t = lambda *s, dtype=torch.float16: torch.empty(*s, device="meta", dtype=dtype)  # noqa: E731
    x = t(m, d) if shared_input else t(n, m, d)
    if op == "cuda_forward":
        return (x, t(k, d), t(k) if with_bias else None, None, t(n, r, d), t(n, k, r), 0.5, shared_input)
    if op == "cuda_backward_dx":
        return (t(n, m, k), t(k, d), t(n, r, d), t(n, k, r), 0.5, shared_input)
    return (t(n, m, k), x, t(n, m, r, dtype=torch.float32), t(n, m, r, dtype=torch.float32), 0.5, shared_input)


@needs_extension
@pytest.mark.parametrize("shared_input", [False, True])
@pytest.mark.parametrize("op", OPS)
def test_opcheck_meta(backend_cuda, op, shared_input):
    args = _meta_args(op, shared_input)
    torch.library.opcheck(getattr(torch.ops.lora_ensemble, op).default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@needs_extension
@pytest.mark.parametrize("shared_input", [False, True])
def test_fake_shapes(backend_cuda, shared_input):
    n, m, d, k, r = 3, 7, 24, 10, 5
    out, xa = torch.ops.lora_ensemble.cuda_forward(*_meta_args("cuda_forward", shared_input, with_bias=False))
    assert (out.shape, out.dtype, xa.shape, xa.dtype) == ((n, m, k), torch.float16, (n, m, r), torch.float32)
    dx, dyb = torch.ops.lora_ensemble.cuda_backward_dx(*_meta_args("cuda_backward_dx", shared_input))
    assert dx.shape == ((m, d) if shared_input else (n, m, d)) and dyb.shape == (n, m, r)
    assert dyb.dtype == torch.float32
    dA, dB = torch.ops.lora_ensemble.cuda_backward_lora(*_meta_args("cuda_backward_lora", shared_input))
    assert (dA.shape, dB.shape, dA.dtype, dB.dtype) == ((n, r, d), (n, k, r), torch.float16, torch.float16)


def test_import_loads_no_extension_and_no_cuda():
    code = (
        "import sys, torch, lora_ensemble\n"
        "print('lora_ensemble._C' in sys.modules, 'lora_ensemble.backend_cuda' in sys.modules, "
        "torch.cuda.is_initialized())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.split() == ["False", "False", "False"], result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# The kernel source under host emulation (CPU only, g++ and the CUDA headers): tests/cuda_emulation.py.


@pytest.fixture(scope="module")
def emulation():
    return cuda_emulation.emulation_or_skip()


def _run_case(emulation, dtype, n, m, d, k, r, shared, bias, shift, sms, scaling=0.7):
    """Forward, dx and the weight gradients of one case against the float64 reference, every buffer in
    NaN guard zones; returns the outputs."""
    inp = make_inputs(n, m, d, k, r, dtype=dtype, shared_input=shared, bias=bias, requires_grad=(), scaling=scaling)
    x_rows = inp.x.reshape(m, d) if shared else inp.x.reshape(n, m, d)
    x, w, a, b = (Guarded(t, t, shift) for t in (x_rows, inp.weight, inp.lora_A, inp.lora_B))
    bias_buf = Guarded(inp.bias, inp.bias, shift) if bias else None
    out, xa = Guarded(torch.empty(n, m, k, dtype=dtype), shift=shift), Guarded(torch.empty(n, m, r))
    emulation.fused(dtype, True, x.ptr, w.ptr, bias_buf.ptr if bias else None, a.ptr, b.ptr, out.ptr, xa.ptr, n, m, d,
                    k, r, scaling, shared, multiprocessors=sms)
    x64 = x_rows.double().expand(n, m, d) if shared else x_rows.double()
    ref = lora_ensemble_reference(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, scaling, shared)
    assert_close_named("out", out.tensor, ref.reshape(n, m, k), dtype)
    assert_close_named("xa", xa.tensor, x64 @ inp.lora_A.double().transpose(1, 2), torch.float32)

    grad_out = torch.randn(n, m, k).to(dtype)
    dy = Guarded(grad_out, grad_out, shift)
    dx = Guarded(torch.empty((m, d) if shared else (n, m, d), dtype=dtype), shift=shift)
    dyb = Guarded(torch.empty(n, m, r))
    emulation.fused(dtype, False, dy.ptr, w.ptr, None, b.ptr, a.ptr, dx.ptr, dyb.ptr, n, m, k, d, r, scaling, shared,
                    multiprocessors=sms)
    grads = lora_ensemble_reference_backward(grad_out.reshape(-1, k), inp.x, inp.weight, inp.lora_A, inp.lora_B,
                                             scaling, shared)
    assert_close_named("dx", dx.tensor, grads.x.reshape(dx.tensor.shape), dtype)
    assert_close_named("dyb", dyb.tensor, grad_out.double() @ inp.lora_B.double(), torch.float32)

    grad_A, grad_B = Guarded(inp.lora_A, shift=shift), Guarded(inp.lora_B, shift=shift)
    assert emulation.grad_row_splits(n, m, d, k, r, sms) == 1
    emulation.lora_grads(dtype, x.ptr, dy.ptr, xa.ptr, dyb.ptr, grad_A.ptr, grad_B.ptr, n, m, d, k, r, scaling, shared,
                         multiprocessors=sms)
    assert_close_named("dA", grad_A.tensor, grads.lora_A, dtype)
    assert_close_named("dB", grad_B.tensor, grads.lora_B, dtype)
    for name, buf in {"out": out, "xa": xa, "dx": dx, "dyb": dyb, "dA": grad_A, "dB": grad_B}.items():
        buf.check_guards(name)
    return {"out": out.tensor.clone(), "xa": xa.tensor.clone(), "dx": dx.tensor.clone(), "dyb": dyb.tensor.clone()}


FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (dtype, N, rows per member, d, k, r, shared_input, bias, shift, SMs planned for): float64 reference,
# forward and backward, every row-tile regime of the planner (launch_policy.cuh). Shift: operands
# misaligned by that many elements (element loads instead of cp.async).
EMULATION_CASES = [
    (FP16, 16, 1, 40, 72, 8, False, True, 0, 132),  # decode: one 16-row tile holds the single rows of 16 members
    (BF16, 16, 1, 264, 136, 16, False, True, 0, 132),  # decode, split-K: 2 ranges of d, 2 column tiles
    (FP32, 16, 1, 36, 24, 16, False, True, 0, 132),  # decode on the SIMT path
    (BF16, 8, 2, 48, 40, 16, False, True, 0, 132),  # 8 members x 2 rows: one tile
    (FP16, 64, 1, 24, 40, 1, False, True, 0, 132),  # N = 64, rank 1: four tiles of 16 members
    (FP16, 8, 13, 72, 100, 8, False, True, 0, 132),  # 16-row tiles straddling member boundaries (13 rows)
    (BF16, 16, 16, 40, 72, 16, False, True, 0, 132),  # 16 rows per member: 64-row tiles of 4 members
    (FP16, 4, 50, 40, 72, 8, False, False, 0, 132),  # 50 rows per member: 64-row tiles of up to 3 members
    (FP32, 4, 50, 40, 72, 8, False, True, 0, 132),  # the same on the SIMT path
    (FP16, 2, 70, 40, 136, 8, False, True, 0, 132),  # 64-row tiles, one straddling row 70; two column tiles
    (BF16, 2, 70, 40, 136, 8, False, True, 0, 132),  # the same in bf16
    (FP16, 2, 65, 64, 129, 128, False, True, 0, 132),  # rank 128 on 64-row tiles, straddling; the expand over sLow
    (BF16, 8, 1, 32, 40, 100, False, True, 0, 132),  # rank 100 at decode: tiles of 4 whole members
    (FP32, 5, 3, 36, 24, 128, False, False, 0, 132),  # fp32 rank 128, 3 rows per member: tiles of whole members
    (FP16, 2, 9, 20, 36, 33, False, False, 1, 132),  # misaligned operands (element loads), no bias, rank tile 64
    (FP16, 1, 17, 16, 24, 20, False, True, 0, 132),  # one member
    (FP32, 1, 1, 24, 40, 1, False, True, 1, 132),  # one row in all, misaligned
    (FP32, 3, 37, 100, 130, 33, True, False, 0, 132),  # shared input, SIMT
    (FP16, 3, 21, 24, 40, 128, True, True, 0, 132),  # shared input, rank 128
    (BF16, 3, 21, 24, 40, 128, True, True, 0, 132),
    (FP16, 10, 5, 24, 40, 40, True, True, 0, 132),  # shared: 10 members in passes of 8; forward in 2 member groups
    (BF16, 16, 20, 264, 40, 8, True, True, 0, 132),  # shared batch-1-like: x W0^T once for 16 members, split-K
    (FP16, 3, 70, 24, 40, 8, True, True, 0, 132),  # shared on 64-row tiles: one member per pass, x W0^T kept
    (FP16, 3, 37, 264, 100, 8, False, True, 0, 1),  # one SM: no split-K
    (BF16, 3, 37, 264, 100, 8, False, True, 0, 132),  # 64-row tiles with split-K
]


def _case_id(c) -> str:
    dtype, n, m, d, k, r, shared, bias, shift, sms = c
    return (f"{str(dtype)[6:]}-N{n}-M{m}-d{d}-k{k}-r{r}{'-shared' if shared else ''}{'' if bias else '-nobias'}"
            f"{'-shift' if shift else ''}-sm{sms}")


@pytest.mark.parametrize("case", EMULATION_CASES, ids=_case_id)
def test_kernels_under_host_emulation(emulation, case):
    _run_case(emulation, *case)


def test_planner_tiles_the_stacked_rows_as_one_matrix(emulation):
    """The row tiles of launch_policy.cuh: at decode one 16-row tile holds every member's row (W0
    read once); 8 x 2 rows likewise; 64-row tiles of 4 members at 16 rows per member (W0 read 4
    times, not 16); whole members per tile where a 16-row tile would hold more members than the
    kernel has shrink slices for."""
    plan = emulation.plan(BF16, True, 16, 1, 4096, 4096, 16, False)
    assert (plan.block_rows, plan.tile_members, plan.tile_rows, plan.row_tiles) == (16, 16, 16, 1)
    assert plan.col_tiles == 32 and plan.k_splits == 4 and plan.k_per_split == 1024  # 128 CTAs on 132 SMs
    plan = emulation.plan(BF16, True, 8, 2, 4096, 4096, 16, False)
    assert (plan.tile_rows, plan.row_tiles) == (16, 1)
    plan = emulation.plan(BF16, True, 16, 16, 4096, 4096, 16, False)
    assert (plan.block_rows, plan.tile_members, plan.tile_rows, plan.row_tiles) == (64, 4, 64, 4)
    plan = emulation.plan(BF16, False, 16, 512, 4096, 4096, 16, False)
    assert (plan.block_rows, plan.tile_rows, plan.row_tiles, plan.k_splits) == (64, 64, 128, 1)
    plan = emulation.plan(BF16, True, 16, 1, 4096, 4096, 128, False)
    assert (plan.tile_members, plan.tile_rows, plan.row_tiles) == (4, 4, 4)
    plan = emulation.plan(BF16, True, 16, 50, 768, 768, 8, True)  # ViT-B/32 batch 1, first layer
    assert (plan.block_rows, plan.member_groups, plan.tile_members, plan.row_tiles, plan.k_splits) == (16, 1, 16, 4, 5)


SPLIT_K_CASES = [
    (BF16, 16, 1, 264, 136, 16, False, True, 0, 132),  # stacked decode: 2 ranges x 2 column tiles
    (BF16, 16, 20, 264, 40, 8, True, True, 0, 132),  # shared input: 2 ranges x 2 row tiles
    (FP32, 3, 37, 264, 100, 8, False, True, 0, 132),  # SIMT, 64-row tiles
]


@pytest.mark.parametrize("case", SPLIT_K_CASES, ids=_case_id)
def test_split_k_result_does_not_depend_on_the_arrival_order(emulation, case):
    """Split-K: whichever CTA of a tile arrives last adds the ranges' partial sums, always in range
    order, so the outputs are bitwise the same for any CTA order (grid order, reversed, shuffled)."""
    dtype, n, m, d, k, r, shared, bias, shift, sms = case
    assert emulation.plan(dtype, True, n, m, d, k, r, shared, sms).k_splits > 1
    runs = []
    for order in (0, 1, 2):
        torch.manual_seed(0)
        with emulation.cta_order(order, seed=7):
            runs.append(_run_case(emulation, *case))
    for name in runs[0]:
        for other in runs[1:]:
            assert torch.equal(runs[0][name], other[name]), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_weight_gradient_row_splits_under_host_emulation(emulation, dtype):
    """Long inputs whose (column tile, member) CTAs alone leave SMs idle: the weight gradients'
    rows are split into ranges whose partial sums meet in fp32 outputs (one range under deterministic
    algorithms)."""
    n, m, d, k, r, s = 2, 1100, 24, 40, 3, 0.7
    assert emulation.grad_row_splits(n, m, d, k, r) == 2
    assert emulation.grad_row_splits(n, m, d, k, r, deterministic=True) == 1
    x, grad_out = torch.randn(n, m, d).to(dtype), torch.randn(n, m, k).to(dtype)
    xa, dyb = torch.randn(n, m, r), torch.randn(n, m, r)
    sum_A, sum_B = torch.zeros(n, r, d), torch.zeros(n, k, r)
    emulation.lora_grads(dtype, x.data_ptr(), grad_out.data_ptr(), xa.data_ptr(), dyb.data_ptr(), sum_A.data_ptr(),
                         sum_B.data_ptr(), n, m, d, k, r, s, False)
    assert_close_named("dA (split)", sum_A, s * dyb.double().transpose(1, 2) @ x.double(), dtype)
    assert_close_named("dB (split)", sum_B, s * grad_out.double().transpose(1, 2) @ xa.double(), dtype)


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_low_rank_update_over_a_given_base_under_host_emulation(emulation, dtype, shared):
    """Without W0 (a base layer the kernels cannot read): the forward adds the given base output and
    the members' update, the dx kernel computes the update's part alone."""
    s = 0.7
    n, m, d, k, r = 3, 37, 40, 72, 5
    inp = make_inputs(n, m, d, k, r, dtype=dtype, shared_input=shared, requires_grad=(), scaling=s)
    x_rows = inp.x.reshape(m, d) if shared else inp.x.reshape(n, m, d)
    base = torch.randn((m, k) if shared else (n, m, k)).to(dtype)
    out, xa = torch.empty(n, m, k, dtype=dtype), torch.empty(n, m, r)
    emulation.fused(dtype, True, x_rows.data_ptr(), None, None, inp.lora_A.data_ptr(), inp.lora_B.data_ptr(),
                    out.data_ptr(), xa.data_ptr(), n, m, d, k, r, s, shared, base=base.data_ptr())
    x64 = x_rows.double().expand(n, m, d) if shared else x_rows.double()
    want = base.double() + s * x64 @ inp.lora_A.double().transpose(1, 2) @ inp.lora_B.double().transpose(1, 2)
    assert_close_named("out", out, want, dtype)

    dy = torch.randn(n, m, k).to(dtype)
    dx, dyb = torch.empty((m, d) if shared else (n, m, d), dtype=dtype), torch.empty(n, m, r)
    emulation.fused(dtype, False, dy.data_ptr(), None, None, inp.lora_B.data_ptr(), inp.lora_A.data_ptr(),
                    dx.data_ptr(), dyb.data_ptr(), n, m, k, d, r, s, shared)
    want_dx = s * dy.double() @ inp.lora_B.double() @ inp.lora_A.double()
    assert_close_named("dx", dx, want_dx.sum(0) if shared else want_dx, dtype)


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_nonfinite_factors_stay_in_their_member_under_host_emulation(emulation, shared):
    """A row tile holds several members' rows (here all 15 stacked rows), yet each row meets only its
    own member's factors: NaN in one member's lora_B reaches that member's outputs and no other's."""
    n, m, d, k, r, s = 3, 5, 16, 24, 2, 0.7
    inp = make_inputs(n, m, d, k, r, dtype=torch.float16, shared_input=shared, requires_grad=(), scaling=s)
    x_rows = inp.x.reshape(m, d) if shared else inp.x.reshape(n, m, d)
    runs = []
    for poison in (False, True):
        b = inp.lora_B.clone()
        if poison:
            b[2, 4, 1] = float("nan")  # member 2, output column 4
        out, xa = torch.empty(n, m, k, dtype=torch.float16), torch.empty(n, m, r)
        emulation.fused(torch.float16, True, x_rows.data_ptr(), inp.weight.data_ptr(), inp.bias.data_ptr(),
                        inp.lora_A.data_ptr(), b.data_ptr(), out.data_ptr(), xa.data_ptr(), n, m, d, k, r, s, shared)
        runs.append(out)
    clean, out = runs
    assert torch.isnan(out[2, :, 4]).all()
    assert torch.equal(out[:2], clean[:2])
    keep = [c for c in range(k) if c != 4]
    assert torch.equal(out[2][:, keep], clean[2][:, keep])


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_fp16_split_beyond_fp16_range_under_host_emulation(emulation, shared):
    """The fp16 hi + lo split of s * x A^T (forward) and of xa / dyb (weight gradients) with values
    beyond fp16's range, whose exact products are well inside it: a plain split gives hi = inf,
    lo = -inf and so NaN; the kernels divide such tiles by a power of two instead."""
    n, m, d, k, r, s = 2, 40, 48, 40, 4, 64.0
    inp = make_inputs(n, m, d, k, r, dtype=torch.float16, shared_input=shared, requires_grad=(), scaling=s)
    with torch.no_grad():
        inp.x.mul_(30)
        inp.lora_A.mul_(10 * d**0.5)  # |x A^T| ~ 2e3, |s x A^T| ~ 1.3e5
        inp.lora_B.mul_(1e-3)
    x_rows = inp.x.reshape(m, d) if shared else inp.x.reshape(n, m, d)
    out, xa = torch.empty(n, m, k, dtype=torch.float16), torch.empty(n, m, r)
    emulation.fused(torch.float16, True, x_rows.data_ptr(), inp.weight.data_ptr(), inp.bias.data_ptr(),
                    inp.lora_A.data_ptr(), inp.lora_B.data_ptr(), out.data_ptr(), xa.data_ptr(), n, m, d, k, r, s,
                    shared)
    assert (s * xa).abs().max() > 65504
    ref = lora_ensemble_reference(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, s, shared)
    assert_close_named("out", out, ref.reshape(n, m, k), torch.float16)

    x_small = (x_rows * 1e-6).contiguous()
    grad_out = (torch.randn(n, m, k) * 1e-5).half()
    big_xa, big_dyb = torch.randn(n, m, r) * 1e5, torch.randn(n, m, r) * 1e5
    grad_A, grad_B = torch.empty(n, r, d, dtype=torch.float16), torch.empty(n, k, r, dtype=torch.float16)
    emulation.lora_grads(torch.float16, x_small.data_ptr(), grad_out.data_ptr(), big_xa.data_ptr(), big_dyb.data_ptr(),
                         grad_A.data_ptr(), grad_B.data_ptr(), n, m, d, k, r, s, shared)
    x64 = x_small.double().expand(n, m, d) if shared else x_small.double()
    assert_close_named("dA", grad_A, s * big_dyb.double().transpose(1, 2) @ x64, torch.float16)
    assert_close_named("dB", grad_B, s * grad_out.double().transpose(1, 2) @ big_xa.double(), torch.float16)


# ---------------------------------------------------------------------------------------------
# GPU tests: nothing below runs without a CUDA device.

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (N, rows per member, d, k, rank, lead): tile edges everywhere, d and k both aligned (16-byte
# copies) and misaligned (element fallback), a single row, one member, 3-D inputs, decode sizes.
SHAPES = [
    (3, 37, 72, 100, 8, None),
    (2, 70, 100, 136, 33, (7, 10)),
    (1, 1, 24, 40, 1, None),
    (4, 65, 130, 129, 128, (5, 13)),
    (2, 129, 256, 64, 16, None),
    (1, 33, 8, 300, 64, None),
    (16, 1, 520, 300, 16, None),  # decode: one row tile over 16 members, split-K over d
    (8, 2, 264, 136, 8, None),  # 8 members x 2 rows
    (64, 1, 96, 80, 128, None),  # rank 128 at decode: row tiles of whole members
]


def _ids(shape) -> str:
    n, m, d, k, r, lead = shape
    return f"N{n}-M{m}-d{d}-k{k}-r{r}" + ("-3d" if lead else "")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared_input", [False, True], ids=["stacked", "shared"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_against_reference(shape, shared_input, dtype):
    n, m, d, k, r, lead = shape
    inp = make_inputs(n, m, d, k, r, dtype=dtype, device="cuda", shared_input=shared_input, lead=lead)
    check_against_reference(inp, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [1, 8, 33, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ranks_noncontiguous_no_bias(rank, dtype):
    inp = make_inputs(3, 45, 96, 80, rank, dtype=dtype, device="cuda", bias=False, noncontiguous=True, scaling=1.0)
    check_against_reference(inp, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("requires_grad", [("x",), ("lora_A",), ("lora_B",), ("lora_A", "lora_B")])
def test_partial_gradients(requires_grad):
    inp = make_inputs(2, 31, 40, 56, 8, dtype=torch.float16, device="cuda", requires_grad=requires_grad)
    check_against_reference(inp, "cuda")


def _member_rows(inp):
    n, d = inp.lora_A.shape[0], inp.weight.shape[1]
    return inp.x.reshape(-1, d) if inp.shared_input else inp.x.reshape(n, -1, d)


@pytest.mark.gpu
@pytest.mark.parametrize("shared_input", [False, True], ids=["stacked", "shared"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_low_rank_byproducts(shared_input, dtype):
    """xa = x A^T and dyb = dy B come back in fp32, for every row of every member."""
    import lora_ensemble.backend_cuda as bc

    inp = make_inputs(3, 77, 136, 72, 20, dtype=dtype, device="cuda", shared_input=shared_input, requires_grad=())
    x = _member_rows(inp)
    out, xa = bc.forward(x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling, shared_input)
    x64 = x.double() if not shared_input else x.double().expand(3, *x.shape)
    assert xa.dtype == torch.float32
    assert_close_named("xa", xa, x64 @ inp.lora_A.double().transpose(1, 2), dtype)
    dy = torch.randn_like(out)
    dx, dyb = bc.backward_dx(dy, inp.weight, inp.lora_A, inp.lora_B, inp.scaling, shared_input)
    assert dyb.dtype == torch.float32
    assert_close_named("dyb", dyb, dy.double() @ inp.lora_B.double(), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shared_input", [False, True], ids=["stacked", "shared"])
@pytest.mark.parametrize("op", OPS)
def test_opcheck_cuda(backend_cuda, op, shared_input):
    """Schema, fake impl and dispatch checks of opcheck on real CUDA tensors."""
    args = tuple(torch.randn(a.shape, dtype=a.dtype, device="cuda") if isinstance(a, torch.Tensor) else a
                 for a in _meta_args(op, shared_input))
    torch.library.opcheck(getattr(torch.ops.lora_ensemble, op).default, args)


@pytest.mark.gpu
def test_large_members_and_rows():
    """Many row tiles and members; M not a multiple of the tile."""
    inp = make_inputs(16, 197, 192, 192, 8, dtype=torch.bfloat16, device="cuda")
    check_against_reference(inp, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shared_input_dx_at_batch_1_sizes(dtype):
    """Batch-1 sizes (few tiles, 16 members): the shared-input dx sums every member in one pass per
    CTA and keeps the GPU busy with split-K, whose ranges the last CTA of each tile adds in order: it
    agrees with the float64 reference and is bitwise repeatable, with and without deterministic
    algorithms (no atomics)."""
    n, m, d, k, r, s = 16, 197, 192, 576, 8, 0.5
    inp = make_inputs(n, m, d, k, r, dtype=dtype, device="cuda", shared_input=True, requires_grad=(), scaling=s)
    dy = torch.randn(n, m, k, device="cuda").to(dtype)
    want = lora_ensemble_reference_backward(dy.reshape(-1, k), inp.x, inp.weight, inp.lora_A, inp.lora_B, s, True).x
    backward_dx = torch.ops.lora_ensemble.cuda_backward_dx
    once, again = (backward_dx(dy, inp.weight, inp.lora_A, inp.lora_B, s, True)[0] for _ in range(2))
    assert_close_named("dx", once, want, dtype)
    assert torch.equal(once, again)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(backward_dx(dy, inp.weight, inp.lora_A, inp.lora_B, s, True)[0], once)
    finally:
        torch.use_deterministic_algorithms(deterministic)


@pytest.mark.gpu
def test_nan_propagates_only_to_its_row():
    inp = make_inputs(2, 20, 32, 24, 4, dtype=torch.float16, device="cuda", requires_grad=())
    x = inp.x.clone()
    x[3, 5] = float("inf")
    out = torch.ops.lora_ensemble.cuda_forward(x.reshape(2, 20, 32), inp.weight, inp.bias, None, inp.lora_A,
                                               inp.lora_B, inp.scaling, False)[0].reshape(40, 24)
    assert not torch.isfinite(out[3]).all()
    assert torch.isfinite(torch.cat([out[:3], out[4:]])).all()


@pytest.mark.gpu
def test_bad_inputs_raise_named_errors():
    inp = make_inputs(2, 8, 32, 24, 4, dtype=torch.float16, device="cuda", requires_grad=())
    x3 = inp.x.reshape(2, 8, 32)
    fwd = torch.ops.lora_ensemble.cuda_forward
    with pytest.raises(RuntimeError, match="lora_B shape"):
        fwd(x3, inp.weight, inp.bias, None, inp.lora_A, inp.lora_B[:, :-1].contiguous(), 1.0, False)
    with pytest.raises(RuntimeError, match="weight has dtype"):
        fwd(x3, inp.weight.float(), inp.bias, None, inp.lora_A, inp.lora_B, 1.0, False)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        fwd(x3.transpose(1, 2).contiguous().transpose(1, 2), inp.weight, inp.bias, None, inp.lora_A, inp.lora_B, 1.0,
            False)
    with pytest.raises(RuntimeError, match=r"rank r=129"):
        a, b = torch.zeros(2, 129, 32, device="cuda", dtype=torch.half), torch.zeros(2, 24, 129, device="cuda",
                                                                                      dtype=torch.half)
        fwd(x3, inp.weight, inp.bias, None, a, b, 1.0, False)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        fwd(x3, inp.weight.cpu(), inp.bias, None, inp.lora_A, inp.lora_B, 1.0, False)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3, 50, 64, 48), (16, 1, 512, 48)], ids=["batch", "decode-split-k"])
@pytest.mark.parametrize("shared_input", [False, True], ids=["stacked", "shared"])
def test_cuda_graph_capture(shared_input, shape):
    """The kernels launch on the current stream, so a captured graph replays them on new data; at
    decode sizes the fused kernels run split-K, whose workspace and zeroed arrival counters are
    allocated and filled inside the capture."""
    import lora_ensemble.backend_cuda as bc

    n, m, d, k = shape
    inp = make_inputs(n, m, d, k, 8, dtype=torch.float16, device="cuda", shared_input=shared_input,
                      requires_grad=())
    x = _member_rows(inp).clone()
    dy = torch.randn(n, m, k, device="cuda", dtype=torch.float16)

    def step():
        out, xa = bc.forward(x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling, shared_input)
        dx, dyb = bc.backward_dx(dy, inp.weight, inp.lora_A, inp.lora_B, inp.scaling, shared_input)
        dA, dB = bc.backward_lora(dy, x, xa, dyb, inp.scaling, shared_input)
        return out, dx, dA, dB

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.copy_(torch.randn_like(x))
    dy.copy_(torch.randn_like(dy))
    graph.replay()
    torch.cuda.synchronize()

    x_user = x.reshape(-1, d)  # stacked [N*M, d] or shared [M, d]
    ref = lora_ensemble_reference(x_user, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling, shared_input)
    grads = lora_ensemble_reference_backward(dy.reshape(-1, k), x_user, inp.weight, inp.lora_A, inp.lora_B,
                                             inp.scaling, shared_input)
    tol = TOLERANCES[torch.float16]
    assert_close_named("out", captured[0].reshape(-1, k), ref, torch.float16, tol)
    assert_close_named("dx", captured[1].reshape(-1, d), grads.x, torch.float16, tol)
    assert_close_named("dA", captured[2], grads.lora_A, torch.float16, tol)
    assert_close_named("dB", captured[3], grads.lora_B, torch.float16, tol)
