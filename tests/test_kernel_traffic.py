"""What the fused Triton kernels read, load by load, under the interpreter.

Every ``tl.load`` the interpreter runs is intercepted (``InterpreterBuilder.create_masked_load``), its
unmasked addresses attributed to the operand whose storage holds them (W0, x or dy, A, B, bias), and
the distinct elements of each load summed per operand over one launch. The counts must equal the
tile-by-tile model :func:`benchmarks.kernel_traffic.fused_kernel_traffic` (which ``benchmarks/NOTES.md``
uses for the headline shapes) and stay within the design's budget
:func:`benchmarks.kernel_traffic.traffic_budget`: W0 once per row tile of a plain GEMM over the N*M
stacked rows (at most 1/8 more where each member's rows are tiled on their own), so once in all at
decode (16 members x 1 row, 8 x 2 rows). Forward and dx, stacked and
shared input; the shapes are scaled down (the interpreter is slow) but keep the tilings of the
headline ones (one row tile at decode, 64-row tiles of several members, tiles straddling members, member
tiles).
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter

import numpy as np
import pytest
import torch
import triton
from triton.runtime import interpreter

from benchmarks.kernel_traffic import fused_kernel_traffic, lora_grads_traffic, traffic_budget
from lora_ensemble.kernels import fused_lora_gemm
from lora_ensemble.kernels.configs import (
    INTERPRETER_FUSED_LORA_GEMM_CONFIG,
    INTERPRETER_LORA_GRADS_CONFIG,
    column_group,
    dot_precision,
    fused_lora_gemm_configs,
    shared_input_configs,
)
from lora_ensemble.kernels.fused_lora_gemm import launch_fused_lora_gemm
from lora_ensemble.kernels.gpu_specs import gpu_spec
from lora_ensemble.kernels.lora_grads import launch_lora_grads

from .utils import only_stacked_configs, split_k_into

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                                reason="counts the loads of Triton's CPU interpreter")

BLOCK_N = INTERPRETER_FUSED_LORA_GEMM_CONFIG.kwargs["BLOCK_N"]


@contextlib.contextmanager
def counted_loads(operands: dict[str, torch.Tensor], workspace: dict[str, torch.Tensor] | None = None):
    """Count, per named operand, the distinct elements each interpreted ``tl.load`` reads from its
    storage (summed over the loads of the block), and from the tensors ``workspace`` holds when the load
    runs (a launcher's own, added during the launch). Yields the Counter; a load from no named operand
    fails."""
    counts: Counter[str] = Counter()
    original = interpreter.InterpreterBuilder.create_masked_load

    def counting_load(self, ptrs, mask, *args, **kwargs):
        addresses = np.unique(np.asarray(ptrs.data)[np.asarray(mask.data, dtype=bool)])
        spans = {name: (t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
                 for name, t in {**operands, **(workspace or {})}.items()}
        for name, (begin, end) in spans.items():  # an element's first byte address counts it once
            inside = (addresses >= begin) & (addresses < end)
            counts[name] += int(inside.sum())
            addresses = addresses[~inside]
        assert addresses.size == 0, f"{addresses.size} elements loaded from no operand"
        return original(self, ptrs, mask, *args, **kwargs)

    interpreter.InterpreterBuilder.create_masked_load = counting_load
    try:
        yield counts
    finally:
        interpreter.InterpreterBuilder.create_masked_load = original


def run_counted(n: int, m: int, d: int, k: int, r: int, role: str, shared: bool, workspace: dict | None = None):
    """One launch of the forward (``role="forward"``) or dx kernel on random fp32 operands; returns
    the counts by kernel role (weight, in, shrink, expand; and the split-K kernel's ``workspace``,
    filled by the launch: a dict whose tensors count under their names) and the tiling it ran with."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(k, d, generator=g)
    lora_a, lora_b = torch.randn(n, r, d, generator=g), torch.randn(n, k, r, generator=g)
    if role == "forward":
        inp = torch.randn((m, d) if shared else (n, m, d), generator=g)
        bias = torch.randn(k, generator=g)
        operands = {"weight": weight, "in": inp, "shrink": lora_a, "expand": lora_b, "bias": bias}
        call = (inp, weight.t(), lora_a.transpose(1, 2), lora_b.transpose(1, 2), bias, 0.5)
        inner, cols, sum_members = d, k, False
    else:
        inp = torch.randn(n, m, k, generator=g)
        operands = {"weight": weight, "in": inp, "shrink": lora_b, "expand": lora_a}
        call = (inp, weight, lora_b, lora_a, None, 0.5)
        inner, cols, sum_members = k, d, shared
    configs = shared_input_configs() if shared else fused_lora_gemm_configs()  # the interpreter's one
    tiling, _, _ = fused_lora_gemm.fused_tiling(configs, shared, m, n, inner, cols, r, torch.float32,
                                                dot_precision(torch.float32), gpu_spec(torch.device("cpu")), 0,
                                                sum_members=sum_members)
    with counted_loads(operands, workspace) as counts:
        launch_fused_lora_gemm(*call, sum_members=sum_members)
    return counts, tiling, inner, cols


# (N, rows per member, d, k, r): the tilings of the headline shapes, scaled (C a multiple of BLOCK_N
# except where noted, so that "once per row tile" is exactly the weight's size per row tile).
SHAPES = [
    (16, 1, 48, 64, 8),  # decode: 16 members x 1 row, one 16-row tile, 2 passes of 8
    (8, 2, 48, 64, 16),  # 8 members x 2 rows: one 16-row tile
    (16, 16, 32, 64, 16),  # 16 rows a member: 64-row tiles of 4 members (W0 4 times, not 16)
    (4, 50, 32, 64, 8),  # batch-1 ViT: 64-row tiles of 2-3 members
    (2, 130, 32, 40, 3),  # 64-row tiles (3xTF32), one straddling the members (2 slots); C not a multiple
    (2, 130, 32, 40, 20),  # the same at rank tile 32 (fp32 3xTF32 caps the tile at 64 rows: 2 slots)
    (2, 1030, 32, 40, 3),  # member tiles: 9 128-row tiles a member, the last padded (1/8 more W0 at most)
    (3, 1, 32, 64, 100),  # rank 128 tile at decode: one member a pass
]


def shape_id(shape) -> str:
    n, m, d, k, r = shape
    return f"N{n}-M{m}-d{d}-k{k}-r{r}"


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
@pytest.mark.parametrize("role", ["forward", "dx"])
@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(s) for s in SHAPES])
def test_loads_match_the_model_and_the_budget(shape, role, shared):
    n, m, d, k, r = shape
    counts, tiling, inner, cols = run_counted(n, m, d, k, r, role, shared)
    layout = {"shared_input": shared and role == "forward", "sum_members": shared and role == "dx",
              "member_tiles": tiling.member_tiles}
    model = fused_kernel_traffic(n, m, inner, cols, r, tiling.block_m, BLOCK_N, tiling.rank_slots, **layout)
    budget = traffic_budget(n, m, inner, cols, r, tiling.block_m, BLOCK_N, **layout)
    for operand in ("weight", "in", "shrink", "expand"):
        assert counts[operand] == model[operand], (operand, dict(counts), model, tiling)
        assert counts[operand] <= budget[operand], (operand, dict(counts), budget, tiling)


@pytest.mark.parametrize("role", ["forward", "dx"])
@pytest.mark.parametrize("shape", [(4, 50, 64, 64, 8), (8, 2, 64, 128, 16), (2, 1030, 64, 64, 3)],
                         ids=["64-row tiles", "one tile", "member tiles"])
def test_column_groups_read_the_shrink_once_per_group(shape, role, monkeypatch, tf32_matmuls):
    """Column groups of 2 (``COL_TILES``): W0 and ``in`` as without groups, the shrink factor once per
    group of column tiles instead of once per tile, loads equal to the model's (fp32 with TF32 allowed:
    3xTF32 dots run no groups)."""
    n, m, d, k, r = shape
    grouped = triton.Config({**INTERPRETER_FUSED_LORA_GEMM_CONFIG.kwargs, "COL_TILES": 2}, num_warps=8, num_stages=2)
    only_stacked_configs(monkeypatch, [grouped])
    counts, tiling, inner, cols = run_counted(n, m, d, k, r, role, shared=False)
    (tuning,) = fused_lora_gemm._STACKED.tunings.values()
    assert tuning.config is grouped and not tiling.multi_pass, tuning.config
    grouped_model = fused_kernel_traffic(n, m, inner, cols, r, tiling.block_m, BLOCK_N, tiling.rank_slots,
                                         member_tiles=tiling.member_tiles, col_group=2)
    ungrouped = fused_kernel_traffic(n, m, inner, cols, r, tiling.block_m, BLOCK_N, tiling.rank_slots,
                                     member_tiles=tiling.member_tiles)
    assert {name: counts[name] for name in grouped_model} == grouped_model
    assert grouped_model["shrink"] * 2 == ungrouped["shrink"]
    assert all(grouped_model[name] == ungrouped[name] for name in ("weight", "in", "expand"))


@pytest.mark.parametrize("role", ["forward", "dx"])
@pytest.mark.parametrize("n,m", [(16, 1), (8, 2)], ids=["16x1", "8x2"])
def test_decode_reads_w0_once_for_all_members(n, m, role):
    """The issue's measurement: at decode the old tiling read W0 once per member (16 and 8 times)."""
    d, k = 96, 64  # both multiples of BLOCK_N: whole column tiles
    counts, tiling, _, _ = run_counted(n, m, d, k, 8, role, shared=False)
    assert tiling.block_m == 16 and n * m <= tiling.block_m
    assert counts["weight"] == d * k, f"W0 read {counts['weight'] / (d * k):g} times"
    # x A^T is recomputed in every column tile: A is read once per column tile, B once.
    shrink, expand = (n * 8 * d, n * k * 8) if role == "forward" else (n * k * 8, n * 8 * d)
    col_tiles = -(-(k if role == "forward" else d) // BLOCK_N)
    assert counts["shrink"] == col_tiles * shrink and counts["expand"] == expand


@pytest.mark.parametrize("role", ["forward", "dx"])
@pytest.mark.parametrize("shape", [(16, 1, 256, 200, 8), (4, 3, 200, 130, 16), (2, 70, 130, 140, 3)],
                         ids=["decode", "tiles straddling members", "member tiles"])
def test_split_k_reads_w0_once_per_row_tile(shape, role, monkeypatch):
    """Split-K (3 ranges where the reduction is long enough): W0, in and shrink read as without, each
    range its part of them; the expand once per range; and the tiles' last programs read back every
    range's fp32 sums and rank blocks (nothing else: the workspace is the only other operand)."""
    split_k_into(monkeypatch, 3)
    workspace = {}
    make_workspace = fused_lora_gemm._SplitK.workspace

    def registered(split, device):
        partial, arrivals, per_split, splits = make_workspace(split, device)
        workspace.update(partial=partial, arrivals=arrivals)
        return partial, arrivals, per_split, splits

    monkeypatch.setattr(fused_lora_gemm._SplitK, "workspace", registered)
    n, m, d, k, r = shape
    counts, tiling, inner, cols = run_counted(n, m, d, k, r, role, shared=False, workspace=workspace)
    (split,) = fused_lora_gemm._SPLIT_K.values()
    splits = split.splits
    assert tiling.k_splits == splits > 1
    model = fused_kernel_traffic(n, m, inner, cols, r, tiling.block_m, BLOCK_N, tiling.rank_slots,
                                 member_tiles=tiling.member_tiles, k_splits=splits)
    unsplit = fused_kernel_traffic(n, m, inner, cols, r, tiling.block_m, BLOCK_N, tiling.rank_slots,
                                   member_tiles=tiling.member_tiles)
    assert {name: counts[name] for name in model} == model
    assert model["partial"] == splits * n * m * (cols + r) and model["expand"] == splits * unsplit["expand"]
    assert all(model[name] == unsplit[name] for name in ("weight", "in", "shrink"))
    budget = traffic_budget(n, m, inner, cols, r, tiling.block_m, BLOCK_N, member_tiles=tiling.member_tiles)
    assert counts["weight"] <= budget["weight"]


def test_shared_input_reads_w0_once_per_row_tile_for_all_members():
    """Batch 1 with a shared input: one base GEMM for all 16 members (no member groups)."""
    counts, tiling, _, _ = run_counted(16, 9, 32, 64, 8, "forward", shared=True)
    assert tiling.block_m == 16 and tiling.rank_slots == 8 and tiling.multi_pass
    assert counts["weight"] == 32 * 64
    assert counts["in"] == 2 * 2 * 9 * 32  # 2 column tiles, each reads the 9 rows once per pass of 8 members


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
@pytest.mark.parametrize("splits", [1, 3])
def test_weight_gradient_loads_match_the_model(splits, shared):
    """dA and dB: x and dy read once, the fp32 rank products once per column tile of dA and dB."""
    n, m, d, k, r = 3, 40, 48, 40, 5
    g = torch.Generator().manual_seed(0)
    x = torch.randn((m, d) if shared else (n, m, d), generator=g)
    dy = torch.randn(n, m, k, generator=g)
    xa, dyb = torch.randn(n, m, r, generator=g), torch.randn(n, m, r, generator=g)
    with counted_loads({"x": x, "dy": dy, "xa": xa, "dyb": dyb}) as counts:
        launch_lora_grads(dy, x, xa, dyb, 0.5, splits=splits)
    assert dict(counts) == lora_grads_traffic(n, m, d, k, r, INTERPRETER_LORA_GRADS_CONFIG.kwargs["BLOCK_C"])


def test_predictions_assume_column_tiles_the_pruning_keeps():
    """The NOTES table's column tile comes from the configs the run-time pruning keeps on an H100 (it
    once assumed 256-wide tiles that are pruned): at decode's 16-row tiles never 256 wide, and for
    fwd_bwd only tiles kept for the dx kernel too."""
    from benchmarks.kernel_traffic import HEADLINE_SHAPES, kept_column_tiles
    from lora_ensemble.kernels.configs import FALLBACK_FUSED_LORA_GEMM_CONFIG, FUSED_LORA_GEMM_GPU_CONFIGS

    listed = {(c.kwargs["BLOCK_N"], column_group(c))
              for c in (*FUSED_LORA_GEMM_GPU_CONFIGS, FALLBACK_FUSED_LORA_GEMM_CONFIG)}
    for _, n, m, d, k, r, modes in HEADLINE_SHAPES:
        for mode in modes:
            cols = kept_column_tiles(n, m, d, k, r, mode)
            assert cols and set(cols) <= listed, (n, m, mode, cols)
            if mode == "fwd_bwd":
                assert set(cols) <= set(kept_column_tiles(n, m, d, k, r, "fwd")), (n, m, cols)
    decode = kept_column_tiles(16, 1, 4096, 4096, 16, "fwd")
    assert all(block_n < 256 for block_n, _ in decode)
    assert all(group == 1 for _, group in decode), "decode runs further rank passes: no column groups"
