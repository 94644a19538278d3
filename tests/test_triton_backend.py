"""The ``triton`` backend against the float64 reference.

Without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by
conftest.py), which executes the same kernel code with one autotune config; shapes are kept tiny
because the interpreter is slow. With a GPU the same tests run the compiled kernels (fp32 dots are
3xTF32 there by default, one TF32 pass with a looser tolerance when PyTorch allows TF32), and the
``gpu``-marked tests add bf16, TF32, CUDA graphs and larger shapes.
"""

import math
import os
import re

import pytest
import torch
import triton

from lora_ensemble import FusedLoRAEnsembleLinear, fused_lora_ensemble_linear
from lora_ensemble.kernels import fused_lora_gemm, launch_policy, lora_grads
from lora_ensemble.kernels.configs import column_group, dot_precision, tf32_allowed
from lora_ensemble.kernels.fused_lora_gemm import launch_fused_lora_gemm
from lora_ensemble.kernels.launch_policy import block_rank
from lora_ensemble.kernels.lora_grads import launch_lora_grads
from lora_ensemble.reference import lora_ensemble_reference

from .utils import (
    TOLERANCES,
    assert_close_named,
    check_against_reference,
    make_inputs,
    only_stacked_configs,
    split_k_into,
    take_the_split_tiling,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
BF16_IN_INTERPRETER = pytest.mark.skipif(
    INTERPRETING, reason="bf16 tl.dot is silently wrong in the Triton interpreter (triton#11584); GPU only")

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# One TF32 pass rounds both factors to 10 mantissa bits: about 4e-4 relative error per output
# element (relative to the output's RMS), so the worst of ~1e5 elements sits near 2e-3.
TF32_PASS_TOLERANCE = (5e-3, 5e-3)


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """fp32 on the GPU: one TF32 pass when PyTorch allows TF32, else 3xTF32 (fp32 accuracy); the
    interpreter computes fp32 dots in fp32."""
    if dtype == torch.float32 and DEVICE == "cuda" and tf32_allowed():
        return TF32_PASS_TOLERANCE
    return TOLERANCES[dtype]


# (N, rows per member, d, k, r, dtype, shared_input, options); options: "nobias", "noncontig", a lead tuple.
# The stacked kernels tile the N*M stacked rows as one matrix (a row tile may span members); the
# row tile, rank slots and passes each case gets are in the comments (launch_policy).
CASES = [
    (4, 33, 67, 45, 1, torch.float32, False, ()),  # 64-row tiles of 2-3 members, one pass of 4 slots
    (4, 33, 67, 45, 1, torch.float32, True, ()),
    (3, 17, 40, 70, 33, torch.float32, False, ()),  # rank tile 64: one member a pass, up to 3 passes
    (3, 17, 40, 70, 33, torch.float16, True, ()),  # two members a pass: 2 passes
    (2, 130, 20, 70, 3, torch.float32, False, ()),  # 128-row tiles, one straddles the members: 2 slots
    (2, 130, 20, 70, 20, torch.float16, False, ()),  # the same at rank tile 32: the model's 64-row tiles, 2 slots
    (2, 130, 20, 70, 20, torch.float16, False, ("policy_tiling",)),  # the policy's 128: 1 slot and a 2nd pass
    (2, 130, 20, 40, 3, torch.float16, True, ()),
    (1, 1, 19, 23, 4, torch.float16, False, ()),  # N = 1, one row
    (1, 1, 19, 23, 4, torch.float32, True, ()),
    (2, 5, 32, 16, 16, torch.float16, False, ("nobias",)),
    (2, 5, 32, 16, 8, torch.float32, True, ("nobias",)),
    (3, 6, 24, 31, 2, torch.float32, False, ((2, 3),)),
    (3, 6, 24, 31, 2, torch.float16, True, ((2, 3),)),
    (2, 9, 33, 20, 3, torch.float32, False, ("noncontig",)),
    (2, 9, 33, 20, 3, torch.float16, True, ("noncontig",)),
    (16, 3, 16, 24, 8, torch.float16, False, ()),  # 3 rows a member: tiles start mid-member
    (16, 1, 37, 45, 8, torch.float32, False, ()),  # decode: 16 members x 1 row, ONE row tile, 2 passes of 8
    (16, 1, 37, 45, 8, torch.float16, True, ()),
    (8, 2, 29, 47, 16, torch.float16, False, ()),  # 8 members x 2 rows: one row tile, 8 slots
    (64, 1, 19, 33, 1, torch.float32, False, ()),  # N = 64, rank 1: 4 row tiles of 16 members
    (20, 2, 19, 33, 1, torch.float16, True, ()),  # 20 members shared: 8 members a pass, 3 passes
    (3, 1, 21, 35, 128, torch.float32, False, ()),  # rank 128 at decode: one member a pass, 3 passes
    (3, 5, 21, 35, 128, torch.float16, False, ()),  # rank 128, 5 rows a member: 3 passes
    (3, 5, 21, 35, 128, torch.float32, True, ()),
    (3, 50, 23, 17, 8, torch.float32, False, ()),  # 50 rows a member (batch-1 ViT): 64-row tiles of 2-3
    (2, 128, 20, 40, 3, torch.float16, False, ()),  # member tiles: one 128-row tile a member
    (2, 1030, 19, 21, 5, torch.float32, False, ("noncontig",)),  # member tiles: 9 a member, the last padded
    (3, 520, 21, 35, 128, torch.float16, False, ()),  # rank tile 128: 64-row member tiles, 9 a member
]


def case_id(case) -> str:
    n, m, d, k, r, dtype, shared, options = case
    rows = "x".join(map(str, options[0])) if options and isinstance(options[0], tuple) else str(m)
    flags = "".join(f"-{o}" for o in options if isinstance(o, str))
    return f"N{n}-M{rows}-d{d}-k{k}-r{r}-{DTYPE_NAMES[dtype]}-{'shared' if shared else 'stacked'}{flags}"


def inputs_for(case):
    n, m, d, k, r, dtype, shared, options = case
    lead = next((o for o in options if isinstance(o, tuple)), None)
    return make_inputs(n, m, d, k, r, dtype=dtype, device=DEVICE, shared_input=shared, bias="nobias" not in options,
                       lead=lead, noncontiguous="noncontig" in options)


def run_the_policys_tiling(monkeypatch) -> None:
    """Make the launchers run the launch policy's own row tiling, none of the smaller ones the config
    model may prefer (``launch_policy.stacked_tilings``), with launch tables of their own."""
    monkeypatch.setattr(fused_lora_gemm, "stacked_tilings", lambda *args: launch_policy.stacked_tilings(*args)[:1])
    monkeypatch.setattr(fused_lora_gemm, "shared_tilings", lambda *args: launch_policy.shared_tilings(*args)[:1])
    for kernel in (fused_lora_gemm._STACKED, fused_lora_gemm._SHARED):
        monkeypatch.setattr(kernel, "bound", {})
        monkeypatch.setattr(kernel, "tunings", {})


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_forward_backward_match_reference(case, monkeypatch):
    if "policy_tiling" in case[7]:
        run_the_policys_tiling(monkeypatch)
    check_against_reference(inputs_for(case), "triton", tolerance(case[5]))


# Column groups (a program owns COL_TILES column tiles and computes its rows' x A^T once for them):
# (N, rows per member, d, k, r, dtype, options, the group sizes some launch of the case runs).
GROUP_CASES = [
    (4, 33, 61, 45, 1, torch.float32, (), (2,)),  # 64-row tiles of 2-3 members, one pass of 4 slots
    (2, 60, 45, 127, 20, torch.float16, (), (2, 4)),  # rank tile 32, a 64-row tile straddling the members: 2 slots
    (2, 1030, 40, 61, 5, torch.float32, ("noncontig",), (2,)),  # member tiles: 9 a member, the last padded
    (8, 2, 33, 47, 16, torch.float16, (), (2,)),  # one 16-row tile of 8 members, 8 slots
    (1, 1, 50, 40, 4, torch.float32, (), (2,)),  # N = 1, one row
    (3, 6, 50, 40, 2, torch.float16, ((2, 3),), (2,)),  # a 4-D input
    (3, 5, 40, 35, 128, torch.float16, (), ()),  # rank tile 128, 3 members a tile: further passes, no group
    (3, 50, 23, 17, 8, torch.float32, (), ()),  # one column tile: no group
]


@pytest.mark.parametrize("col_tiles", [2, 4])
@pytest.mark.parametrize("case", GROUP_CASES, ids=[case_id((*c[:6], False, c[6])) for c in GROUP_CASES])
def test_column_groups_match_reference(case, col_tiles, monkeypatch, tf32_matmuls):
    """The stacked kernels with column groups of ``col_tiles`` as the only candidate, forward, dx and
    the weight gradients against the float64 reference. The pruning keeps the group wherever the
    tiling runs one rank pass and the column tiles (32 wide) fill whole groups, else its fallback;
    never for 3xTF32 dots, so fp32 runs with TF32 allowed."""
    grouped = triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "COL_TILES": col_tiles}, num_warps=8,
                            num_stages=2)
    only_stacked_configs(monkeypatch, [grouped])
    n, m, d, k, r, dtype, options, grouped_at = case
    check_against_reference(inputs_for((n, m, d, k, r, dtype, False, options)), "triton", tolerance(dtype))
    ran_groups = False
    for (_, tuning_key, _), tuning in fused_lora_gemm._STACKED.tunings.items():
        cols = int(re.search(r" C(\d+) ", tuning_key).group(1))
        groups = " multi" not in tuning_key and -(-cols // 32) % col_tiles == 0
        assert column_group(tuning.config) == (col_tiles if groups else 1), (tuning_key, tuning.config)
        ran_groups |= groups
    assert ran_groups == (col_tiles in grouped_at), "the case's tilings changed"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_column_groups_on_the_gpu_match_reference(dtype, monkeypatch):
    """The package's own column-group candidates, compiled: a ViT-B/32 batch-1 fused qkv layer (16
    members x 50 rows, 768 -> 2304, rank 8: 64-row tiles of 2-3 members, one pass) with only the group
    configs to choose from, forward, dx and the weight gradients against float64. On sm_90 the spill
    record keeps 128 x 2 for this tiling, forward and dx, so groups run (elsewhere the pruning may
    fall back)."""
    from lora_ensemble.kernels.configs import FUSED_LORA_GEMM_GPU_CONFIGS

    groups = [c for c in FUSED_LORA_GEMM_GPU_CONFIGS if column_group(c) > 1]
    only_stacked_configs(monkeypatch, groups)
    check_against_reference(make_inputs(16, 50, 768, 2304, 8, dtype=dtype, device=DEVICE), "triton", tolerance(dtype))
    chosen = [t.config for t in fused_lora_gemm._STACKED.tunings.values()]
    assert len(chosen) == 2 and all(c in groups or column_group(c) == 1 for c in chosen)
    if torch.cuda.get_device_capability() >= (9, 0):
        assert all(c in groups for c in chosen), [c.kwargs for c in chosen]


@pytest.mark.parametrize("role", ["forward", "dx"])
@pytest.mark.parametrize("shape", [(4, 33, 61, 45, 3), (8, 2, 64, 40, 4), (2, 60, 45, 127, 20)],
                         ids=["64-row tiles", "one tile", "rank tile 32"])
def test_column_groups_of_the_delta_kernels_match_float64(shape, role, monkeypatch, tf32_matmuls):
    """The weightless (delta) kernels with column groups of 2: the group's further tiles run no K-loop
    at all, only the kept rank block's expands (and the base output in the forward)."""
    grouped = triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "COL_TILES": 2}, num_warps=8, num_stages=2)
    only_stacked_configs(monkeypatch, [grouped])
    n, m, d, k, r = shape
    inner, cols = (d, k) if role == "forward" else (k, d)
    g = torch.Generator().manual_seed(1)
    inp, shrink, expand = (torch.randn(n, m, inner, generator=g), torch.randn(n, inner, r, generator=g),
                           torch.randn(n, r, cols, generator=g))
    base = torch.randn(n, m, cols, generator=g) if role == "forward" else None
    out, low = launch_fused_lora_gemm(inp.to(DEVICE), None, shrink.to(DEVICE), expand.to(DEVICE), None, 0.7,
                                      base=None if base is None else base.to(DEVICE))
    want_low = inp.double() @ shrink.double()
    want = 0.7 * want_low @ expand.double() + (0 if base is None else base.double())
    (tuning,) = fused_lora_gemm._STACKED.tunings.values()
    assert tuning.config is grouped
    assert_close_named("low", low, want_low, torch.float32, tolerance(torch.float32))
    assert_close_named("out", out, want, torch.float32, tolerance(torch.float32))


# Split-K (decode and small batches on a GPU whose SMs the output tiles leave idle): (N, rows per
# member, d, k, r, dtype, options). d and k >= 128 so both the forward and dx split.
SPLIT_K_CASES = [
    (16, 1, 300, 200, 8, torch.float32, ()),  # decode: one 16-row tile, 2 passes of 8; ranges 128, 128, 44
    (16, 1, 300, 200, 8, torch.float16, ("nobias",)),
    (4, 3, 130, 257, 1, torch.float32, ("noncontig",)),  # rank 1, a tile straddling members, a short last range
    (3, 1, 140, 150, 128, torch.float16, ()),  # rank tile 128: one member a pass, 3 passes
    (2, 70, 192, 140, 5, torch.float32, ()),  # member tiles (64 rows, the second padded)
    (1, 1, 256, 129, 3, torch.float32, ((1, 1),)),  # N = 1, one row, 3-D input
]


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("case", SPLIT_K_CASES, ids=[case_id((*c[:6], False, c[6])) for c in SPLIT_K_CASES])
def test_split_k_matches_reference(case, splits, monkeypatch):
    """The stacked kernel with its reduction split in ranges (the split-K kernel: every range's sums
    and rank blocks added up in range order by the tile's last program): forward, dx and the weight
    gradients against float64; the launches ran split."""
    split_k_into(monkeypatch, splits)
    n, m, d, k, r, dtype, options = case
    check_against_reference(inputs_for((n, m, d, k, r, dtype, False, options)), "triton", tolerance(dtype))
    split_keys = [key for (_, key, _) in fused_lora_gemm._STACKED_SPLIT_K.tunings]
    assert len(split_keys) == 2 and not fused_lora_gemm._STACKED.tunings, split_keys  # forward and dx
    assert all(int(re.search(r" K\d+/(\d+) ", key).group(1)) >= 2 for key in split_keys), split_keys


@pytest.mark.parametrize(("block_k", "d", "k"), [(32, 320, 256), (64, 320, 256), (32, 300, 200)],
                         ids=["128x32", "128x64", "128x32-odd"])
def test_split_k_runs_its_gpu_candidates_tiles(block_k, d, k, monkeypatch):
    """The split kernel's 128-wide GPU candidates (``configs.FUSED_LORA_GEMM_SPLIT_K_GPU_CONFIGS``; the
    interpreter otherwise runs 32 x 32 only) at decode's tiling: widths multiples of 16 as at the
    headline shapes (ranges of 128, 128 and 64 over 320 in the forward, 2 or 4 K steps a range;
    128-wide column tiles over 256 and 320 columns, the last one half full), and for 128 x 32 odd
    widths (the "odd" specialisation, where the pruning drops 128 x 64 for its pointers' registers:
    ranges of 128, 128 and 44, masked K steps); forward, dx and the weight gradients against float64.
    The spill record is left out (it drops 128 x 64 at this tiling on the H100 the interpreter's
    pruning assumes): the tiles' arithmetic is tested here, not their registers."""
    from lora_ensemble.kernels import configs

    (config,) = [c for c in configs.FUSED_LORA_GEMM_SPLIT_K_GPU_CONFIGS
                 if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) == (128, block_k)]
    monkeypatch.setattr(configs, "SPILLING_CONFIGS", frozenset())
    split_k_into(monkeypatch, 3)
    only_stacked_configs(monkeypatch, [config])
    check_against_reference(inputs_for((16, 1, d, k, 8, torch.float16, False, ())), "triton",
                            tolerance(torch.float16))
    tunings = fused_lora_gemm._STACKED_SPLIT_K.tunings
    assert len(tunings) == 2 and all(t.config is config for t in tunings.values()), list(tunings)
    assert all((" odd " in key) == (d % 16 != 0) for (_, key, _) in tunings), list(tunings)


def test_split_k_can_be_turned_off(monkeypatch):
    """``LORA_ENSEMBLE_TRITON_SPLIT_K=0``: where the policy would split K, the stacked kernel runs
    unsplit (forward and dx), with the same results."""
    from lora_ensemble.tuning_store import SPLIT_K_VARIABLE

    monkeypatch.setenv(SPLIT_K_VARIABLE, "0")
    split_k_into(monkeypatch, 3)
    check_against_reference(inputs_for((16, 1, 300, 200, 8, torch.float32, False, ())), "triton",
                            tolerance(torch.float32))
    assert len(fused_lora_gemm._STACKED.tunings) == 2 and not fused_lora_gemm._STACKED_SPLIT_K.tunings


def test_split_k_is_deterministic_and_near_the_unsplit_result(monkeypatch):
    """The ranges are added in order whatever order their programs finish in: the same bits on every
    call; and within fp32 rounding of the kernel that does not split."""
    inp = inputs_for((16, 1, 300, 200, 8, torch.float32, False, ()))
    args = (inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling)
    whole = fused_lora_ensemble_linear(*args, backend="triton")
    split_k_into(monkeypatch, 3)
    first = fused_lora_ensemble_linear(*args, backend="triton")
    assert fused_lora_gemm._STACKED_SPLIT_K.tunings
    assert torch.equal(first, fused_lora_ensemble_linear(*args, backend="triton"))
    torch.testing.assert_close(first, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_split_k_on_the_gpu_matches_reference_and_repeats_bitwise(dtype, monkeypatch):
    """Llama-7B-class q_proj at decode (16 members x 1 row, 4096 -> 4096, rank 16): one 16-row tile
    whose 32 column tiles leave most SMs idle, so the policy splits K (4 ranges on an H100); forward,
    dx and the weight gradients against float64, the same bits on every call (the ranges are added in
    order by each tile's last program, whichever range finishes last), and in a CUDA graph's replays
    (the arrival counts zeroed by a node of the graph), as decode runs under
    ``torch.compile(mode="reduce-overhead")``."""
    # the policy's split tiling whatever the cost model prefers (today the split one too, on the split
    # kernel's 128 x 32 config), so the test does not hang on the model's ranking
    take_the_split_tiling(monkeypatch)
    inp = make_inputs(16, 1, 4096, 4096, 16, dtype=dtype, device=DEVICE)
    check_against_reference(inp, "triton", tolerance(dtype))
    if torch.cuda.get_device_properties(DEVICE).multi_processor_count >= 2 * 32:  # 32 column tiles of 128
        assert fused_lora_gemm._STACKED_SPLIT_K.tunings, "the decode launch did not split K"
    args = (inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling)
    first = fused_lora_ensemble_linear(*args, backend="triton")
    for _ in range(20):
        assert torch.equal(fused_lora_ensemble_linear(*args, backend="triton"), first)
    x_static = inp.x.detach().clone()
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out_static = fused_lora_ensemble_linear(x_static, *args[1:], backend="triton")
    for _ in range(2):
        x_static.copy_(torch.randn_like(x_static))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out_static, fused_lora_ensemble_linear(x_static, *args[1:], backend="triton"))


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_frozen_weight_and_bias_get_grads_when_asked(shared):
    inp = make_inputs(3, 7, 21, 18, 5, device=DEVICE, shared_input=shared,
                      requires_grad=("x", "weight", "bias", "lora_A", "lora_B"))
    check_against_reference(inp, "triton", tolerance(torch.float32))


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_lora_grads_only(shared):
    inp = make_inputs(2, 11, 26, 19, 6, device=DEVICE, shared_input=shared, requires_grad=("lora_A", "lora_B"))
    check_against_reference(inp, "triton", tolerance(torch.float32))


@BF16_IN_INTERPRETER
@pytest.mark.gpu
@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_bf16_matches_reference(shared):
    inp = make_inputs(4, 37, 96, 80, 12, dtype=torch.bfloat16, device=DEVICE, shared_input=shared)
    check_against_reference(inp, "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_vit_sized_layer_matches_reference(dtype, shared):
    # 16 members, batch 1 of 197 tokens, ViT-B width, rank 8; and rank 128, where the policy's tiles
    # need further passes and the launcher runs 16-row member tiles on an H100 (stacked_tilings). Two
    # ranks only: the first GPU pass compiles every key of this test within its budget.
    for rank in (8, 128):
        inp = make_inputs(16, 197, 768, 768, rank, dtype=dtype, device=DEVICE, shared_input=shared)
        check_against_reference(inp, "triton", tolerance(dtype))


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_rank_products_of_every_member_in_every_pass(dtype, shared):
    """``low = x A^T`` (saved for the backward) of every member when a row tile's members need
    several passes of the rank part (rank 128 at 1 and 5 rows a member: one member a pass)."""
    for n, m in ((5, 1), (3, 5)):
        d, k, r, s = 21, 35, 100, 0.8
        inp = make_inputs(n, m, d, k, r, dtype=dtype, device=DEVICE, shared_input=shared, requires_grad=())
        x = inp.x if shared else inp.x.reshape(n, m, d)
        tiling = (launch_policy.shared_tiling(m, k, n, block_rank(r), 0) if shared
                  else launch_policy.stacked_tiling(m, n, block_rank(r)))
        assert tiling.multi_pass, tiling
        out, xa = launch_fused_lora_gemm(x, inp.weight.t(), inp.lora_A.transpose(1, 2), inp.lora_B.transpose(1, 2),
                                         inp.bias, s)
        want = lora_ensemble_reference(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, s, shared_input=shared)
        want_xa = x.double() @ inp.lora_A.double().transpose(1, 2)
        assert_close_named(f"out (N={n}, M={m})", out.reshape(n * m, k), want, dtype, tolerance(dtype))
        assert_close_named(f"xa (N={n}, M={m})", xa, want_xa, dtype, tolerance(dtype))


def test_fp32_dot_precision_follows_torch(tf32_matmuls):
    assert tf32_allowed()
    assert dot_precision(torch.float32) == "tf32"
    assert dot_precision(torch.float16) == "tf32"


def test_fp32_dots_are_3xtf32_without_tf32(fp32_matmuls):
    assert not tf32_allowed()
    assert dot_precision(torch.float32) == "tf32x3"


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_fp32_with_tf32_allowed_matches_reference(shared, tf32_matmuls):
    inp = make_inputs(4, 37, 96, 80, 12, device=DEVICE, shared_input=shared)
    check_against_reference(inp, "triton", TF32_PASS_TOLERANCE)


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_weight_grads_split_over_rows_match_unsplit(shared, dtype):
    """The fp32-atomic split reduction of dA/dB (used on the GPU for long inputs) against float64."""
    n, m, d, k, r, s = 3, 40, 19, 23, 5, 0.6
    x = torch.randn((m, d) if shared else (n, m, d), device=DEVICE).to(dtype)
    grad_out = torch.randn(n, m, k, device=DEVICE).to(dtype)
    xa = torch.randn(n, m, r, device=DEVICE)
    dyb = torch.randn(n, m, r, device=DEVICE)
    x64 = x.double().expand(n, m, d)
    want_a = s * dyb.double().transpose(1, 2) @ x64
    want_b = s * grad_out.double().transpose(1, 2) @ xa.double()
    for splits in (1, 3):
        grad_a, grad_b = launch_lora_grads(grad_out, x, xa, dyb, s, splits=splits)
        assert grad_a.dtype == dtype and grad_b.dtype == dtype
        assert_close_named(f"dA (splits={splits})", grad_a, want_a, dtype, tolerance(dtype))
        assert_close_named(f"dB (splits={splits})", grad_b, want_b, dtype, tolerance(dtype))


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_one_launch_forward_two_launch_backward(shared, monkeypatch):
    launches = []
    kernels = {"fused_lora_gemm": fused_lora_gemm._fused_lora_gemm_kernel,
               "fused_lora_gemm_shared": fused_lora_gemm._fused_lora_gemm_shared_kernel,
               "lora_grads": lora_grads._lora_grads_kernel}
    for name, kernel in kernels.items():
        def counted(*args, _run=kernel.run, _name=name, **kwargs):
            launches.append(_name)
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", counted)
    inp = make_inputs(3, 5, 20, 18, 4, device=DEVICE, shared_input=shared)
    out = fused_lora_ensemble_linear(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling,
                                     shared_input=shared, backend="triton")
    gemm = "fused_lora_gemm_shared" if shared else "fused_lora_gemm"
    assert launches == [gemm]
    out.backward(torch.randn_like(out))
    assert launches == [gemm, gemm, "lora_grads"]


def test_nan_stays_in_its_row():
    inp = make_inputs(2, 6, 20, 18, 3, device=DEVICE, requires_grad=())
    inp.x[1, 4] = float("nan")
    out = fused_lora_ensemble_linear(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling,
                                     backend="triton")
    nan_rows = torch.isnan(out).any(-1)
    assert nan_rows[1] and torch.isnan(out[1]).all()
    assert nan_rows.sum() == 1, f"NaN leaked into rows {nan_rows.nonzero().flatten().tolist()}"


@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_factor_of_one_member_stays_in_its_rows(factor, bad):
    """At decode all 16 members share one row tile and one rank block: a NaN or Inf in member 5's
    A or B reaches its own row of out and dx (as IEEE says) and no other member's, bit for bit."""
    n, d, k, r = 16, 24, 20, 4
    inp = make_inputs(n, 1, d, k, r, device=DEVICE, requires_grad=("x",))
    grad_out = torch.randn(n, k, device=DEVICE)

    def run():
        out = fused_lora_ensemble_linear(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling,
                                         backend="triton")
        (dx,) = torch.autograd.grad(out, inp.x, grad_out)
        return out.detach(), dx

    clean_out, clean_dx = run()
    with torch.no_grad():
        if factor == "lora_B":
            inp.lora_B[5, 3, 2] = bad  # member 5, output column 3: out[5, 3]; dy B, so all of dx[5]
        else:
            inp.lora_A[5, 2, 7] = bad  # member 5, input column 7: x A^T, so all of out[5]; dx[5, 7]
    out, dx = run()
    others = [i for i in range(n) if i != 5]
    torch.testing.assert_close(out[others], clean_out[others], rtol=0, atol=0)
    torch.testing.assert_close(dx[others], clean_dx[others], rtol=0, atol=0)
    hit_out, hit_dx = ([3], list(range(d))) if factor == "lora_B" else (list(range(k)), [7])
    assert not torch.isfinite(out[5, hit_out]).any() and not torch.isfinite(dx[5, hit_dx]).any()
    if bad == float("inf") and factor == "lora_B":
        assert torch.isinf(out[5, 3]), "Inf times a finite rank product is Inf, not NaN"
    assert torch.isfinite(out[5, [c for c in range(k) if c not in hit_out]]).all()
    assert torch.isfinite(dx[5, [c for c in range(d) if c not in hit_dx]]).all()


def test_empty_batch():
    inp = make_inputs(3, 1, 16, 12, 2, device=DEVICE, requires_grad=())
    x = inp.x[:0]
    out = fused_lora_ensemble_linear(x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, backend="triton")
    assert out.shape == (0, 12)


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_launches_that_differ_only_in_member_count_each_get_their_own_grid(shared):
    """A launch key must hold everything the grid depends on: the weight-gradient kernel's grid
    counts the members, which none of its arguments (sizes, strides) says. Member counts up and
    down with every other size equal, each call against the reference (an unwritten gradient stays
    NaN, an access past the members is an error of the interpreter's memcheck)."""
    for num_members in (1, 2, 1, 3, 2):
        case = dict(rows=1, d=33, k=1, rank=4, shared_input=shared, bias=False, scaling=1.0)
        check_against_reference(make_inputs(num_members, device=DEVICE, dtype=torch.float16, **case), "triton")


def test_tiles_pad_rank_and_shrink_for_few_rows():
    P = launch_policy
    assert [block_rank(r) for r in (1, 16, 17, 33, 128)] == [16, 16, 32, 64, 128]
    assert [P.stacked_block_rows(m, 1, 16) for m in (1, 17, 50, 800)] == [16, 32, 64, 128]
    assert P.stacked_block_rows(800, 1, 128) == 64
    assert P.shared_block_rows(800, 768, 16, sm_count=0) == 64
    assert P.stacked_block_rows(800, 1, 16, tf32x3=True) == 64
    assert P.stacked_block_rows(800, 1, 64, tf32x3=True) == 32
    # shared input at batch-1 sizes: 16-row tiles when 64 x 128 ones would leave SMs idle
    assert P.shared_block_rows(197, 768, 16, sm_count=132) == 16
    assert P.shared_block_rows(4096, 768, 16, sm_count=132) == 64


def test_row_tile_members_is_the_most_members_a_tile_spans():
    for m in (1, 2, 3, 5, 16, 17, 50, 64, 100, 1600):
        for block_m in (16, 32, 64, 128):
            for n in (1, 3, 16, 64):
                total = n * m
                most = max(len({row // m for row in range(start, min(start + block_m, total))})
                           for start in range(0, total, block_m))
                assert launch_policy.row_tile_members(m, block_m, n) >= most, (m, block_m, n)
                if -(-total // block_m) >= m // math.gcd(m, block_m):  # tiles start at every offset they can
                    assert launch_policy.row_tile_members(m, block_m, n) == most, (m, block_m, n)


def test_member_tiles_where_tiles_are_a_member_long_and_pad_little():
    """Tiles at least a member long tile each member's rows on their own where that pads at most 1/8 of
    the rows (no tile straddles two members, so no further rank pass); elsewhere the stacked rows."""
    P = launch_policy
    for m in (*range(1, 300), 520, 1030, 1600, 4096):
        for block_m in (16, 32, 64, 128):
            padded = -(-m // block_m) * block_m
            assert P.uses_member_tiles(m, block_m) == (m >= block_m and 8 * padded <= 9 * m), (m, block_m)
    # ViT-B/32 training, 1600 rows: 13 128-row tiles a member (the last 64 rows), one pass.
    vit = P.stacked_tiling(1600, 16, 16)
    assert vit == P.RowTiling(128, 1, False, True) and P.stacked_row_tiles(1600, 16, vit) == 16 * 13
    # ViT-B/16 batch 1, 197 rows: a member's two tiles would be 30% padding, so the stacked rows.
    assert P.stacked_tiling(197, 16, 16) == P.RowTiling(128, 2, False, False)
    assert P.stacked_row_tiles(197, 16, P.stacked_tiling(197, 16, 16)) == -(-16 * 197 // 128)
    # Straddling tiles hold both members in one pass where the rank block has room for two (a [128, 32]
    # block at rank tile 16), else the second member runs a further pass.
    assert P.rank_slots(197, 128, 16, 16) == 2 and P.rank_slots(197, 128, 32, 16) == 1
    assert P.stacked_tiling(197, 16, 32) == P.RowTiling(128, 1, True, False)
    assert P.rank_slots(197, 128, 16, 1) == 1  # one member: nothing to straddle
    # The kernel counts the padded rows in int32: no member tiles where they would reach 2**31.
    # (1030 rows: 9 128-row tiles, 1152 rows a member; 1.9M members stack 1.96e9 rows, pad to 2.19e9.)
    assert P.stacked_tiling(1030, 1_800_000, 16).member_tiles
    assert not P.stacked_tiling(1030, 1_900_000, 16).member_tiles
    # Tiles spanning members (fewer rows than a tile) never use member tiles.
    assert not any(P.stacked_tiling(m, 16, 16).member_tiles for m in (1, 16, 50))


class _SpillsAtRowTiles:
    """A spill record in which every config at the row tiles ``block_ms`` spills (at every tile: None),
    and nothing else."""

    def __init__(self, *block_ms: int) -> None:
        self.block_ms = block_ms

    def __contains__(self, key: tuple) -> bool:
        return not self.block_ms or key[5] in self.block_ms


def test_smaller_row_tiles_where_the_policys_tile_needs_a_further_pass(monkeypatch):
    """Where a row tile spans more members than one pass holds, the further pass can spill with every
    config (the spill record says where) and costs a second K-loop: the launcher then chooses among
    the policy's tiling and the same policy at each halved tile (``launch_policy.stacked_tilings``)
    those whose configs do not all spill (``configs.unspilled_tilings``), the one the config model
    ranks cheapest (``config_model.cheapest_tiling``)."""
    from lora_ensemble.kernels import configs as C
    from lora_ensemble.kernels.config_model import cheapest_tiling, config_cost
    from lora_ensemble.kernels.gpu_specs import H100_SXM
    from lora_ensemble.kernels.launch_costs import stacked_launch

    P, T = launch_policy, launch_policy.RowTiling
    # batch-1 ViT at rank tile 32: 64-row tiles of 3 members need a further pass; 32-row tiles hold their
    # 2 members in one pass of 2 slots. One-pass tilings (rank tile 16) and decode have no alternative.
    assert P.stacked_tilings(50, 16, 32) == (T(64, 2, True), T(32, 2, False), T(16, 2, False))
    assert P.stacked_tilings(50, 16, 16) == (P.stacked_tiling(50, 16, 16),)
    assert P.stacked_tilings(1, 16, 32) == (P.stacked_tiling(1, 16, 32),)  # 16 rows is the least
    for m, r in ((50, 64), (197, 32), (197, 128)):
        tilings = P.stacked_tilings(m, 16, r)
        assert tilings[0] == P.stacked_tiling(m, 16, r) and tilings[0].multi_pass
        assert [t.block_m for t in tilings] == [tilings[0].block_m >> i for i in range(len(tilings))]
        assert tilings[-1].block_m == P.MIN_DOT_TILE
    shared = P.shared_tilings(4096, 4096, 16, 64, 132)
    assert shared[0] == P.shared_tiling(4096, 4096, 16, 64, 132) and [t.block_m for t in shared] == [64, 32, 16]
    assert P.shared_tilings(4096, 4096, 1, 64, 132) == (P.shared_tiling(4096, 4096, 1, 64, 132),)  # one member

    # ViT-B/16 batch 1 (197 rows) at rank 64, bf16 on sm_80: the 128-row tile's second pass spills with
    # every config, the fallback too (the record); the smaller tiles keep configs that do not.
    gpu_configs = list(C.FUSED_LORA_GEMM_GPU_CONFIGS)
    problem = C.FusedProblem(4096, 4096, "bf16", "tf32", 64, 166912, 80)
    tilings = P.stacked_tilings(197, 16, 64)
    assert tilings[0] == T(128, 1, True)
    assert C.fitting_fused_lora_gemm_configs(gpu_configs, problem, tilings[0]) == [C.FALLBACK_FUSED_LORA_GEMM_CONFIG]
    assert C.spill_key("stacked", "bf16", "tf32", 64, 128, C.FALLBACK_FUSED_LORA_GEMM_CONFIG, 80, 1,
                       True) in C.SPILLING_CONFIGS
    options = C.unspilled_tilings(gpu_configs, problem, tilings)
    assert options and tilings[0] not in dict(options)
    for tiling, kept in options:
        assert kept == C.fitting_fused_lora_gemm_configs(gpu_configs, problem, tiling)
        assert not any(C.spill_key("stacked", "bf16", "tf32", 64, tiling.block_m, c, 80, tiling.rank_slots,
                                   tiling.multi_pass, member_tiles=tiling.member_tiles) in C.SPILLING_CONFIGS
                       for c in kept)

    def launch_of(tiling):
        return stacked_launch(16, 197, 4096, 4096, 64, 64, tiling, "tf32", 2)

    def best(option):
        return min(config_cost(c, launch_of(option[0]), H100_SXM).seconds for c in option[1])

    assert cheapest_tiling(options, launch_of, H100_SXM) == min(options, key=best)
    assert cheapest_tiling([options[0], options[0]], launch_of, H100_SXM) is options[0]
    # The measured spills not excluded: the policy's tiling alone; so where every tiling's configs spill.
    unpruned = C.fitting_fused_lora_gemm_configs(gpu_configs, problem, tilings[0], without_measured_spills=False)
    assert C.unspilled_tilings(gpu_configs, problem, tilings, without_measured_spills=False) == [(tilings[0], unpruned)]
    monkeypatch.setattr(C, "SPILLING_CONFIGS", _SpillsAtRowTiles())
    assert C.unspilled_tilings(gpu_configs, problem, tilings) == [(tilings[0], [C.FALLBACK_FUSED_LORA_GEMM_CONFIG])]


def test_the_launcher_runs_a_smaller_row_tile_where_the_policys_spills(monkeypatch):
    """End to end: with every config at 64- and 16-row tiles recorded as spilling, a batch-1-like launch
    (4 members of 50 rows, rank tile 32: 64-row tiles of 3 members, two slots a pass) runs 32-row tiles
    of 2 members in one pass, forward and backward, against the float64 reference."""
    from lora_ensemble.kernels import configs as C

    monkeypatch.setattr(C, "SPILLING_CONFIGS", _SpillsAtRowTiles(64, 16))
    monkeypatch.setattr(fused_lora_gemm._STACKED, "bound", {})
    monkeypatch.setattr(fused_lora_gemm._STACKED, "tunings", {})
    assert launch_policy.stacked_tiling(50, 4, 32) == launch_policy.RowTiling(64, 2, True)
    check_against_reference(make_inputs(4, 50, 24, 40, 20, device=DEVICE, dtype=torch.float32), "triton",
                            tolerance(torch.float32))
    keys = [key for _, key, _ in fused_lora_gemm._STACKED.tunings]
    assert keys and all(" BM32 S2 R32 " in key for key in keys), keys


def test_launch_policy_worked_example():
    """The example in kernels/launch_policy.py: one row tile at decode, 4 members a tile at 16 rows."""
    P = launch_policy
    assert (P.stacked_block_rows(1, 16, 16), P.row_tile_members(1, 16, 16), P.rank_slots(1, 16, 16, 16)) == (16, 16, 8)
    assert P.stacked_block_rows(16, 16, 16) == 64 and P.rank_slots(16, 64, 16, 16) == 4
    assert P.stacked_block_rows(512, 16, 16) == 128 and P.rank_slots(512, 128, 16, 16) == 1
    assert P.stacked_tiling(512, 16, 16).member_tiles
    # rank 128 at decode: one member a pass ([16, 128] blocks), sixteen passes
    assert P.rank_slots(1, 16, 128, 16) == 1 and P.rank_passes(16, 1) == 16
    # batch-1 ViT, 50 rows a member: 64-row tiles hold up to 3 members, one pass of 4 slots
    assert P.stacked_block_rows(50, 16, 16) == 64
    assert P.row_tile_members(50, 64, 16) == 3 and P.rank_slots(50, 64, 16, 16) == 4
    assert P.grad_row_splits(4096, 16, 132, deterministic=False) == 8
    assert P.grad_row_splits(4096, 16, 132, deterministic=True) == 1
    assert P.grad_rows_per_split(1000, 3) == 336


def test_opcheck_fused_linear():
    inp = make_inputs(2, 3, 16, 12, 4, device=DEVICE)
    rows = inp.x.reshape(2, 3, 16).detach().requires_grad_()
    args = (rows, inp.weight, inp.bias, inp.lora_A, inp.lora_B, 0.5, False, "triton")
    torch.library.opcheck(torch.ops.lora_ensemble.fused_linear.default, args)


def test_opcheck_fused_linear_backward():
    inp = make_inputs(2, 3, 16, 12, 4, device=DEVICE, requires_grad=())
    rows = inp.x.reshape(2, 3, 16)
    xa = (rows @ inp.lora_A.transpose(1, 2)).float()
    grad_out = torch.randn(2, 3, 12, device=DEVICE)
    args = (grad_out, rows, inp.weight, inp.lora_A, inp.lora_B, xa, 0.5, False, "triton", True, True)
    torch.library.opcheck(torch.ops.lora_ensemble.fused_linear_backward.default, args)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    layer = FusedLoRAEnsembleLinear(16, 12, num_members=3, rank=4, backend="triton", device=DEVICE)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 5, 16, device=DEVICE, requires_grad=True)
    eager = layer(x)
    (eager_grad,) = torch.autograd.grad(eager.sum(), x)
    compiled_layer = torch.compile(layer, fullgraph=True)
    compiled = compiled_layer(x)
    (compiled_grad,) = torch.autograd.grad(compiled.sum(), x)
    ref = lora_ensemble_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    assert_close_named("compiled out", compiled, ref, torch.float32, tolerance(torch.float32))
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager():
    inp = make_inputs(4, 50, 64, 48, 8, dtype=torch.float16, device="cuda", requires_grad=())
    x_static = inp.x.clone()

    def run():
        return fused_lora_ensemble_linear(x_static, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling,
                                          backend="triton")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # autotune and compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = run()
    x_static.copy_(torch.randn_like(x_static))
    graph.replay()
    torch.cuda.synchronize()
    ref = lora_ensemble_reference(x_static, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling)
    assert_close_named("graph replay out", out_static, ref, torch.float16)


# fp16 keeps |v| <= 65504. The kernels hold the rank-r products (s * x A^T, dy B) and the shared-input
# member sum of dy in fp32; rounding them to fp16 for a tensor-core dot turns a value beyond that range
# into inf (and inf * 0 into NaN at LoRA init, B = 0), although every exact output below is well inside
# fp16. The kernels scale such rows by a power of two instead.

@pytest.mark.parametrize("zero_b", [False, True], ids=["small-B", "B=0"])
@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_fp16_forward_with_rank_product_beyond_fp16_range(shared, zero_b):
    n, m, d, k, r, s = 3, 20, 40, 24, 4, 64.0
    inp = make_inputs(n, m, d, k, r, dtype=torch.float16, device=DEVICE, shared_input=shared, scaling=s,
                      requires_grad=())
    with torch.no_grad():
        inp.x.mul_(30)
        inp.lora_A.mul_(10 * d**0.5)  # |x A^T| ~ 2e3 (fp16-safe), |s x A^T| ~ 1.2e5 (not)
        inp.lora_B.mul_(0.0 if zero_b else 1e-3)
    xa = inp.x.double().reshape(-1, d) @ inp.lora_A.double().transpose(1, 2)
    assert (s * xa).abs().max() > 65504 and xa.abs().max() < 65504
    check_against_reference(inp, "triton")


def test_fp16_weight_grads_of_rank_products_beyond_fp16_range():
    n, m, d, k, r, s = 2, 40, 24, 20, 5, 0.5
    x = (torch.randn(n, m, d, device=DEVICE) * 1e-3).half()
    grad_out = (torch.randn(n, m, k, device=DEVICE) * 1e-3).half()
    xa = torch.randn(n, m, r, device=DEVICE) * 1e5
    dyb = torch.randn(n, m, r, device=DEVICE) * 1e5
    want_a = s * dyb.double().transpose(1, 2) @ x.double()
    want_b = s * grad_out.double().transpose(1, 2) @ xa.double()
    for splits in (1, 2):
        grad_a, grad_b = launch_lora_grads(grad_out, x, xa, dyb, s, splits=splits)
        assert_close_named(f"dA (splits={splits})", grad_a, want_a, torch.float16)
        assert_close_named(f"dB (splits={splits})", grad_b, want_b, torch.float16)


def test_fp16_shared_input_dx_with_member_sum_beyond_fp16_range():
    """dx of a shared input sums dy over the members: 4 x 3e4 exceeds fp16, the sum's product with
    W0 does not."""
    n, m, d, k, r, s = 4, 9, 20, 24, 3, 0.5
    dy = (torch.rand(n, m, k, device=DEVICE) * 1e4 + 2.5e4).half()
    weight = (torch.randn(k, d, device=DEVICE) * 1e-3).half()
    lora_a = torch.randn(n, r, d, device=DEVICE).half()
    lora_b = (torch.randn(n, k, r, device=DEVICE) * 1e-4).half()
    dx, dyb = launch_fused_lora_gemm(dy, weight, lora_b, lora_a, None, s, sum_members=True)
    dyb_64 = dy.double() @ lora_b.double()
    want = (dy.double() @ weight.double() + s * dyb_64 @ lora_a.double()).sum(0)
    assert dy.double().sum(0).abs().max() > 65504
    assert_close_named("dx", dx, want, torch.float16)
    assert_close_named("dyb", dyb, dyb_64, torch.float16, (1e-5, 1e-5))


def test_stacked_rows_beyond_int32_are_a_clear_error():
    """The kernels count the N*M stacked rows in int32: the launcher refuses more, naming them,
    before it allocates or launches anything (broadcast views: nothing that large exists)."""
    n, m = 2**16, 2**15
    x = torch.zeros(1, 1, 16, device=DEVICE).expand(n, m, 16)
    shrink = torch.zeros(1, 16, 2, device=DEVICE).expand(n, 16, 2)
    expand = torch.zeros(1, 2, 8, device=DEVICE).expand(n, 2, 8)
    with pytest.raises(ValueError, match="65536 members x 32768 rows = 2147483648 stacked rows exceed"):
        launch_fused_lora_gemm(x, torch.zeros(16, 8, device=DEVICE), shrink, expand, None, 1.0)


@pytest.mark.gpu
def test_more_members_than_a_grid_y_axis_holds():
    """Members are on grid axis 0 in every kernel, so 65536 members (beyond CUDA's 65535 of axes 1
    and 2) run, forward and backward."""
    inp = make_inputs(65536, 1, 16, 8, 1, dtype=torch.float16, device=DEVICE)
    check_against_reference(inp, "triton", tolerance(torch.float16))


def _two_candidates(monkeypatch) -> dict:
    """Each kernel gets two candidate configs (its interpreter config, and one with a 16-wide tile),
    fresh tuning and launch tables, and a spy on its runs: ``{kernel name: [the varied tile of each run]}``."""
    import triton

    from lora_ensemble.kernels import configs

    fused, grads = configs.INTERPRETER_FUSED_LORA_GEMM_CONFIG, configs.INTERPRETER_LORA_GRADS_CONFIG
    varied = {fused_lora_gemm._STACKED: (fused_lora_gemm, "fused_lora_gemm_configs", fused, "BLOCK_N"),
              fused_lora_gemm._SHARED: (fused_lora_gemm, "shared_input_configs", fused, "BLOCK_K"),
              lora_grads._GRADS: (lora_grads, "lora_grads_configs", grads, "BLOCK_C")}
    ran = {}
    for kernel, (module, lister, config, name) in varied.items():
        pair = [config, triton.Config({**config.kwargs, name: 16}, num_warps=config.num_warps,
                                      num_stages=config.num_stages)]
        monkeypatch.setattr(module, lister, lambda split_k=False, pair=pair: list(pair))
        monkeypatch.setattr(kernel, "bound", {})
        monkeypatch.setattr(kernel, "tunings", {})
        ran[kernel.name] = []

        def spy(*args, _run=kernel.fn.run, _name=name, _ran=ran[kernel.name], **kwargs):
            _ran.append(kwargs[_name])
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel.fn, "run", spy)
    return ran


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_pinned_tuning_never_benchmarks_and_runs_the_models_first(shared, monkeypatch, tmp_path):
    """``LORA_ENSEMBLE_TRITON_AUTOTUNE=0``: each kernel runs the cost model's first candidate on the
    JIT function, nothing is timed (triton 3.6's autotuner timed even a single kept config) and the
    tuning file is not read; with tuning on, the same two candidates are timed."""
    import triton.testing

    from lora_ensemble.tuning_store import CACHE_DIR_VARIABLE, _store

    def no_benchmark(*args, **kwargs):
        raise AssertionError("a benchmark ran")

    monkeypatch.setattr(triton.testing, "do_bench", no_benchmark)
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path))
    _store.cache_clear()
    ran = _two_candidates(monkeypatch)
    inp = make_inputs(3, 5, 20, 24, 4, dtype=torch.float16, device=DEVICE, shared_input=shared)
    monkeypatch.setenv("LORA_ENSEMBLE_TRITON_AUTOTUNE", "0")
    check_against_reference(inp, "triton", tolerance(torch.float16))
    for kernel in (fused_lora_gemm._SHARED if shared else fused_lora_gemm._STACKED, lora_grads._GRADS):
        assert kernel.tunings, f"{kernel.name} never launched"
        for tuning in kernel.tunings.values():
            assert tuning.source == "pinned: the model's first" and not tuning.timings_us
    # One config per kernel, the same at every run: forward (and dx) and the weight gradients.
    ran_configs = {name: set(tiles) for name, tiles in ran.items() if tiles}
    assert all(len(tiles) == 1 for tiles in ran_configs.values()), ran_configs
    monkeypatch.setenv("LORA_ENSEMBLE_TRITON_AUTOTUNE", "1")
    with pytest.raises(AssertionError, match="a benchmark ran"):
        fused_lora_ensemble_linear(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling,
                                   shared_input=shared, backend="triton")
    _store.cache_clear()


def test_a_tuned_key_is_timed_once_stored_and_read_by_a_new_process(monkeypatch, tmp_path):
    """With tuning on, a new key's candidates are timed once (each on the call's arguments) and the
    fastest runs and is stored; a new process (fresh tables) reads it and times nothing; later launches
    of the key reuse the bound kernel without choosing again."""
    import triton.testing

    from lora_ensemble.tuning_store import CACHE_DIR_VARIABLE, _store

    timed = []

    def fake_bench(fn, **kwargs):  # the interpreter cannot time: each candidate runs once, 16-wide "faster"
        fn()
        timed.append(ran["fused_lora_gemm"][-1])
        return 1.0 if timed[-1] == 16 else 2.0

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path))
    monkeypatch.delenv("LORA_ENSEMBLE_TRITON_AUTOTUNE", raising=False)
    _store.cache_clear()
    ran = _two_candidates(monkeypatch)
    inp = make_inputs(3, 5, 20, 24, 4, dtype=torch.float16, device=DEVICE, requires_grad=())
    check_against_reference(inp, "triton", tolerance(torch.float16))
    assert sorted(timed) == [16, 32] and ran["fused_lora_gemm"][-1] == 16
    (tuning,) = fused_lora_gemm._STACKED.tunings.values()
    assert tuning.source == "timed" and sorted(tuning.timings_us.values()) == [1000.0, 2000.0]
    for _ in range(2):  # the bound kernel: no new tuning, no timing
        fused_lora_ensemble_linear(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling, backend="triton")
    assert len(timed) == 2 and ran["fused_lora_gemm"][-3:] == [16, 16, 16]
    # A new process: the stored winner, nothing timed.
    _store.cache_clear()
    monkeypatch.setattr(fused_lora_gemm._STACKED, "bound", {})
    monkeypatch.setattr(fused_lora_gemm._STACKED, "tunings", {})
    check_against_reference(inp, "triton", tolerance(torch.float16))
    (tuning,) = fused_lora_gemm._STACKED.tunings.values()
    assert tuning.source == "stored" and len(timed) == 2 and ran["fused_lora_gemm"][-1] == 16
    _store.cache_clear()


def test_launch_specialisation_follows_the_widths_not_the_rank():
    """Spill records are kept per argument specialisation: rank 8 or 50 rows (odd sizes, odd
    rank strides, one row a member) keep a launch "aligned", odd widths make it "odd"."""
    from lora_ensemble.kernels.configs import argument_specialisation

    rank8 = dict(ROWS=50, MEMBERS=3, INNER=768, COLS=768, RANK=8, stride_in_m=768, stride_in_k=1, stride_weight_k=1,
                 stride_weight_c=768, stride_shrink_n=8 * 768, stride_shrink_r=768, stride_expand_c=8, stride_low_m=8,
                 stride_low_n=400, stride_base_n=0, HAS_WEIGHT=True)
    assert argument_specialisation(rank8) == "aligned"
    assert argument_specialisation({**rank8, "ROWS": 1}) == "aligned"
    assert argument_specialisation({**rank8, "INNER": 100, "stride_in_m": 100}) == "odd"


def test_tuning_keys_name_the_gpu_and_size_buckets():
    """A config chosen for one GPU model (pruned by its shared memory) or one row / member count is
    never reused on another GPU model or on very different counts: those are part of every tuning
    key (the tuning file is also one per GPU model)."""
    from lora_ensemble.kernels.configs import FUSED_LORA_GEMM_GPU_CONFIGS, FusedProblem, fitting_fused_lora_gemm_configs

    for rows, members in ((5, 3), (40, 3), (5, 9)):
        inp = make_inputs(members, rows, 20, 24, 4, device=DEVICE, requires_grad=())
        fused_lora_ensemble_linear(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling, backend="triton")
    from lora_ensemble.kernels.gpu_specs import gpu_spec

    gpu = gpu_spec(torch.device(DEVICE)).name  # the H100 the cost model assumes off the GPU
    keys = {key for _, key, _ in fused_lora_gemm._STACKED.tunings}
    for rows, members in ((8, 4), (64, 4), (8, 16)):
        assert any(f"rows{rows} members{members} " in key and key.endswith(gpu) for key in keys), keys
    kept = {smem: fitting_fused_lora_gemm_configs(list(FUSED_LORA_GEMM_GPU_CONFIGS),
                                                  FusedProblem(4096, 4096, "fp32", "tf32", 16, smem, cap),
                                                  launch_policy.RowTiling(128, 1, False))
            for smem, cap in ((232448, 90), (101376, 86))}  # H100, RTX 3090
    assert len(kept[101376]) < len(kept[232448])


def test_delta_kernels_are_pruned_by_spills_of_their_own():
    """The weightless (delta) kernels spill at configs where the full ones do not, and the other way
    round: each is pruned by its own record, and they never share a tuned config."""
    from lora_ensemble.kernels import aot
    from lora_ensemble.kernels.configs import (
        FALLBACK_FUSED_LORA_GEMM_CONFIG,
        FUSED_LORA_GEMM_GPU_CONFIGS,
        SPILLING_CONFIGS,
        FusedProblem,
        fitting_fused_lora_gemm_configs,
        spill_key,
        spill_key_config,
    )

    for kernel in (fused_lora_gemm._fused_lora_gemm_kernel, fused_lora_gemm._fused_lora_gemm_shared_kernel):
        assert "HAS_WEIGHT" in kernel.arg_names
    kinds = {key[1] for key in SPILLING_CONFIGS}
    assert kinds <= {"stacked", "shared", "stacked_delta", "shared_delta", "stacked_split", "lora_grads"}, kinds
    assert aot.ROLE_KERNEL["forward_split_k"] == aot.ROLE_KERNEL["backward_dx_split_k"] == "stacked_split"
    assert aot.ROLE_KERNEL["forward_shared_delta"] == "shared_delta"
    assert aot.ROLE_KERNEL["backward_dx_delta"] == "stacked_delta"
    assert aot.ROLE_KERNEL["backward_dx_shared"] == "shared"
    stacked = [k for k in SPILLING_CONFIGS if k[1] in ("stacked", "stacked_delta")]
    assert {k[1] for k in stacked} == {"stacked", "stacked_delta"}
    for key in stacked:
        arch, kind, dtype, precision, block_r, block_m, slots, multi_pass, member_tiles, specialisation = key[:10]
        if spill_key_config(key) == spill_key_config(spill_key(kind, "", "", 0, 0, FALLBACK_FUSED_LORA_GEMM_CONFIG, 0)):
            continue  # the fallback is no candidate: nothing prunes it
        tiling = {"rank_slots": slots, "multi_pass": multi_pass, "member_tiles": member_tiles,
                  "specialisation": specialisation}
        config = next(c for c in FUSED_LORA_GEMM_GPU_CONFIGS
                      if spill_key(kind, dtype, precision, block_r, block_m, c, arch, **tiling) == key)
        kept = {has_weight: fitting_fused_lora_gemm_configs(
                    list(FUSED_LORA_GEMM_GPU_CONFIGS),
                    FusedProblem(4096, 4096, dtype, precision, block_r, 232448, arch, specialisation,
                                 has_weight=has_weight),
                    launch_policy.RowTiling(block_m, slots, multi_pass, member_tiles))
                for has_weight in (True, False)}
        delta = kind == "stacked_delta"
        other_key = spill_key("stacked" if delta else "stacked_delta", dtype, precision, block_r, block_m, config, arch,
                              **tiling)
        assert config not in kept[not delta], key
        assert (config in kept[delta]) == (other_key not in SPILLING_CONFIGS), key


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_on_the_tensors_device_not_the_current_one():
    inp = make_inputs(3, 9, 40, 24, 4, dtype=torch.float16, device="cuda:1", requires_grad=())
    with torch.cuda.device(0):
        out = fused_lora_ensemble_linear(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling,
                                         backend="triton")
    torch.cuda.synchronize(1)
    ref = lora_ensemble_reference(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling)
    assert_close_named("out", out, ref, torch.float16)
