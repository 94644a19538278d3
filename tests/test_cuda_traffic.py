"""Traffic of the CUDA fused kernels, counted under the host emulation (tests/cuda_emulation.py):
every element the kernels' operand loads (cp.async copies and element loads) read from W0, from
`in` (x, or dy for dx), from the shrink factor (A, or B for dx) and from the expand factor (B, or A),
in one call, against the budget of tests/traffic_budget.py. The decisive cases are decode (16
members x 1 row) and 8 members x 2 rows: the stacked rows are one 16-row tile, so W0 is read once,
not once per member.
"""

from __future__ import annotations

import math

import pytest
import torch

from . import cuda_emulation
from .traffic_budget import fused_traffic_budget, member_tiles, plain_gemm_weight_reads

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(scope="module")
def emulation():
    return cuda_emulation.emulation_or_skip()


def _count_call(emulation, dtype, forward, n, m, d, k, r, shared, sms):
    """Runs one fused call on random data and returns the elements read per operand and its plan."""
    inner, cols = (d, k) if forward else (k, d)
    in_rows = m if shared and forward else n * m
    inp = torch.randn(in_rows, inner).to(dtype)
    weight = torch.randn(k, d).to(dtype)
    shrink = torch.randn(n, r, d).to(dtype) if forward else torch.randn(n, k, r).to(dtype)  # A or B
    expand = torch.randn(n, k, r).to(dtype) if forward else torch.randn(n, r, d).to(dtype)  # B or A
    out = torch.empty((m, cols) if shared and not forward else (n * m, cols), dtype=dtype)
    low = torch.empty(n, m, r)
    with emulation.watching(weight=weight, inp=inp, shrink=shrink, expand=expand) as counts:
        emulation.fused(dtype, forward, inp.data_ptr(), weight.data_ptr(), None, shrink.data_ptr(), expand.data_ptr(),
                        out.data_ptr(), low.data_ptr(), n, m, inner, cols, r, 0.5, shared, multiprocessors=sms)
    return counts, emulation.plan(dtype, forward, n, m, inner, cols, r, shared, sms)


# (dtype, N, rows per member, d, k, r, shared input, SMs planned for, W0 reads in units of W0)
TRAFFIC_CASES = [
    (BF16, 16, 1, 64, 256, 16, False, 132, 1),  # decode: one 16-row tile, W0 once
    (BF16, 16, 1, 512, 256, 16, False, 132, 1),  # decode, split-K in 4 ranges of d: W0 still once
    (FP16, 8, 2, 64, 256, 8, False, 132, 1),  # 8 members x 2 rows: W0 once
    (FP32, 16, 1, 64, 256, 16, False, 132, 1),  # decode on the SIMT path
    (BF16, 16, 16, 64, 256, 16, False, 132, 4),  # 16 rows per member: 64-row tiles of 4 members, W0 4 times
    (FP16, 8, 13, 64, 256, 8, False, 132, 7),  # 104 rows in 16-row tiles crossing member boundaries
    (FP16, 3, 50, 64, 256, 8, False, 132, 3),  # 150 rows in 64-row tiles of up to 3 members
    (FP16, 2, 70, 64, 256, 8, False, 132, 3),  # 140 rows in 64-row tiles, one straddling row 70
    (BF16, 16, 20, 64, 256, 8, True, 132, 2),  # shared input: W0 once per row tile for all 16 members
    (FP16, 10, 5, 64, 256, 40, True, 132, 2),  # shared, 2 passes of 8 members: forward 2 groups, dx 2 passes
    (BF16, 16, 1, 64, 256, 128, False, 132, 4),  # rank 128 at decode: tiles of 4 whole members, W0 4 times
]


def _id(case) -> str:
    dtype, n, m, d, k, r, shared, sms, _ = case
    return f"{str(dtype)[6:]}-N{n}-M{m}-d{d}-k{k}-r{r}{'-shared' if shared else ''}"


@pytest.mark.parametrize("forward", [True, False], ids=["forward", "dx"])
@pytest.mark.parametrize("case", TRAFFIC_CASES, ids=_id)
def test_fused_kernel_reads_within_the_budget(emulation, case, forward):
    dtype, n, m, d, k, r, shared, sms, weight_units = case
    counts, plan = _count_call(emulation, dtype, forward, n, m, d, k, r, shared, sms)
    inner, cols = (d, k) if forward else (k, d)
    passes = math.ceil(n / plan.tile_members) if shared else 1
    budget = fused_traffic_budget(n, m, inner, cols, r, shared=shared, forward=forward, tile_rows=plan.tile_rows,
                                  passes=passes, member_groups=plan.member_groups)
    # W0: once per row tile, as a plain GEMM over the same rows with the same row tile.
    assert counts["weight"] == budget.weight == weight_units * inner * cols, (counts, plan)
    if not shared and plan.tile_rows == plan.block_rows:
        assert counts["weight"] <= plain_gemm_weight_reads(n * m, inner, cols, plan.block_rows)
    # in: once per column tile (the shared forward: once per pass).
    assert counts["inp"] == budget.inp, (counts, plan)
    # Factors: once per (row tile, column tile, member the tile holds), within the stated bound.
    pairs = member_tiles(n, m, plan.tile_rows, shared)
    assert counts["shrink"] == plan.col_tiles * pairs * r * inner <= budget.shrink, (counts, plan)
    assert counts["expand"] == pairs * cols * r <= budget.expand, (counts, plan)


def test_decode_reads_w0_once_where_one_member_per_tile_read_it_per_member(emulation):
    """The issue's measurement, for the CUDA kernels: at decode (16 members x 1 row) a tiling with one
    member per row tile reads W0 16 times; these kernels read it once, and the factors once per
    column tile (the shrink is recomputed per column tile: N r / BN = 2 W0 sizes at rank 16)."""
    n, m, d, k, r = 16, 1, 64, 256, 16
    counts, plan = _count_call(emulation, BF16, True, n, m, d, k, r, False, 132)
    assert plan.row_tiles == 1 and counts["weight"] == d * k
    one_member_per_tile = n * d * k
    assert counts["weight"] * n == one_member_per_tile
    assert counts["shrink"] == plan.col_tiles * n * r * d
