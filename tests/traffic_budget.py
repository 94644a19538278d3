"""The traffic budget of the fused kernels: how many elements one call may read from each operand,
in one place (the CUDA traffic test holds the kernels to it under the host emulation; a Triton test
can hold its kernels to the same formulas).

A fused call runs the GEMM ``in @ W`` over ``in_rows`` rows (stacked: the N*M rows of every member;
shared input: the M shared rows) with its low-rank part, ``inner`` the reduction length and ``cols``
the output width (forward: in = x, W = W0^T, shrink = A, expand = B, inner = d, cols = k; dx: in =
dy, W = W0, shrink = B, expand = A, inner = k, cols = d). With row tiles of ``tile_rows`` rows and
column tiles of ``block_cols`` columns, the budget is what a plain GEMM tiled the same way reads,
plus the factors once per (row tile, column tile, member the row tile holds):

- W0: once per row tile, ``row_tiles * inner * cols`` (a plain GEMM over the same rows with the same
  row tile; at decode, 16 members x 1 row in one 16-row tile, that is W0 once);
- in: once per column tile, ``col_tiles * N * M * inner`` (the shared forward's x: ``col_tiles * M * inner``);
- shrink: ``col_tiles * member_tiles * r * inner``, expand: ``member_tiles * cols * r``, where
  ``member_tiles`` counts (row tile, member) pairs: at most ``row_tiles + N - 1`` stacked (each member
  boundary inside a tile adds one), ``row_tiles * N`` with a shared input.

Passes (shared input, more members than one pass of a CTA takes): the shared-input forward reads its
in tiles once per pass and W0 once per member group; the shared-input dx reads W0 once per pass.

Run ``python -m tests.traffic_budget`` for the table of benchmarks/NOTES.md: the CUDA plan of the
headline shapes on an H100 (132 SMs), W0's and A's reads, the L2 and HBM bytes, and a roofline
prediction of the device time against F.linear's (the model's constants below, guesses marked in
NOTES).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Traffic:
    """Elements one call reads per operand (forward: shrink = A, expand = B; dx: shrink = B, expand = A)."""

    weight: int
    inp: int
    shrink: int
    expand: int


def member_tiles(members: int, rows: int, tile_rows: int, shared: bool) -> int:
    """(row tile, member) pairs: the exact count for row tiles of ``tile_rows`` stacked rows from row 0
    (each holds the members whose rows it holds), every member for every shared row tile."""
    if shared:
        return math.ceil(rows / tile_rows) * members
    total = members * rows
    return sum((min(start + tile_rows, total) - 1) // rows - start // rows + 1 for start in range(0, total, tile_rows))


def fused_traffic_budget(members: int, rows: int, inner: int, cols: int, rank: int, *, shared: bool, forward: bool,
                         tile_rows: int, block_cols: int = 128, passes: int = 1, member_groups: int = 1) -> Traffic:
    """The most elements a fused call may read per operand (module docstring)."""
    row_tiles = math.ceil((rows if shared else members * rows) / tile_rows)
    col_tiles = math.ceil(cols / block_cols)
    pairs_bound = row_tiles * members if shared else row_tiles + members - 1
    weight_reads = (member_groups if forward else passes) if shared else 1
    # in rows read per column tile: the shared forward's x [M, d] once per pass; else every member's rows.
    in_rows_read = rows * passes if shared and forward else members * rows
    return Traffic(weight=row_tiles * inner * cols * weight_reads,
                   inp=col_tiles * in_rows_read * inner,
                   shrink=col_tiles * pairs_bound * rank * inner,
                   expand=pairs_bound * cols * rank)


def plain_gemm_weight_reads(in_rows: int, inner: int, cols: int, block_rows: int) -> int:
    """W0 elements a plain GEMM over ``in_rows`` rows with ``block_rows``-row tiles reads."""
    return math.ceil(in_rows / block_rows) * inner * cols


# The headline shapes: (label, N, rows per member, d, k, r, modes).
HEADLINE_SHAPES = [
    ("ViT-B/32 N16 r8, 50 rows a member", 16, 50, 768, 768, 8, ("fwd", "fwd_bwd")),
    ("ViT-B/32 N16 r8, 1600 rows a member", 16, 1600, 768, 768, 8, ("fwd", "fwd_bwd")),
    ("q_proj 4096^2 N16 r16, 1 row a member", 16, 1, 4096, 4096, 16, ("fwd",)),
    ("q_proj 4096^2 N16 r16, 16 rows a member", 16, 16, 4096, 4096, 16, ("fwd",)),
    ("q_proj 4096^2 N16 r16, 512 rows a member", 16, 512, 4096, 4096, 16, ("fwd",)),
]

# The prediction model's H100 SXM numbers (bf16; guesses where marked in benchmarks/NOTES.md).
HBM_BYTES_PER_S = 2.8e12  # sustained HBM3 (3.35 TB/s peak)
L2_BYTES_PER_S = 6.0e12  # L2 -> SM, all SMs (guess)
WMMA_FLOPS = 330e12  # mma.sync through WMMA at one 8-warp CTA per SM (guess; dense peak 989e12)
CUBLAS_FLOPS = 660e12  # F.linear (cuBLAS, wgmma) at these sizes
SMS = 132
OVERHEAD_S = 2e-6  # per fused launch: pipeline fill, epilogue, split-K tail (guess)


def _fused_call(emulation, n, m, inner, cols, r, forward):  # pragma: no cover - a report, run by hand
    """(L2 bytes, HBM bytes, MMA flop, CTAs) of one bf16 fused call under the CUDA plan."""
    import torch

    plan = emulation.plan(torch.bfloat16, forward, n, m, inner, cols, r, False)
    pairs = member_tiles(n, m, plan.tile_rows, False)
    rank_pad = max(16, 1 << (r - 1).bit_length())
    rows = n * m
    reads = fused_traffic_budget(n, m, inner, cols, r, shared=False, forward=forward, tile_rows=plan.tile_rows)
    elements = reads.weight + reads.inp + plan.col_tiles * pairs * r * inner + pairs * cols * r
    partials = 0 if plan.k_splits == 1 else 2 * 4 * plan.k_splits * (rows * cols + plan.col_tiles * rows * r)
    l2 = 2 * elements + 2 * rows * cols + 4 * rows * r + partials
    hbm = 2 * (inner * cols + rows * inner + n * r * (inner + cols) + rows * cols) + 4 * rows * r  # each once
    padded_rows = plan.row_tiles * plan.block_rows
    flop = 2 * padded_rows * cols * inner  # the base, padding rows included
    flop += 2 * 256 * inner * plan.col_tiles * pairs * (rank_pad // 16)  # shrink items, per column tile
    flop += 2 * 2 * 16 * rank_pad * cols * pairs * plan.block_rows // 16  # expand (hi and lo), per member held
    ctas = plan.row_tiles * plan.col_tiles * plan.k_splits
    return l2, hbm, flop, ctas, plan


def _grads_call(n, m, d, k, r):  # pragma: no cover - a report, run by hand
    """(L2 bytes, flop, CTAs) of the weight-gradient launch: x and dy once, xa and dyb once per column tile."""
    rank_pad = max(16, 1 << (r - 1).bit_length())
    rows = n * m
    col_tiles = math.ceil(d / 128) + math.ceil(k / 128)
    l2 = 2 * rows * (d + k) + 4 * rows * r * col_tiles + 2 * n * r * (d + k)
    return l2, 2 * 2 * rows * rank_pad * (d + k), n * col_tiles


def _seconds(l2, hbm, flop, ctas):  # pragma: no cover - a report, run by hand
    busy = min(ctas, SMS) / SMS  # the share of SMs a grid of one wave keeps busy
    return max(hbm / HBM_BYTES_PER_S, l2 / L2_BYTES_PER_S, flop / (WMMA_FLOPS * busy)) + OVERHEAD_S


def _linear_seconds(rows, d, k):  # pragma: no cover - a report, run by hand
    return max(2 * rows * d * k / CUBLAS_FLOPS, 2 * (d * k + rows * (d + k)) / HBM_BYTES_PER_S) + OVERHEAD_S


def headline_table() -> str:  # pragma: no cover - a report, run by hand
    """benchmarks/NOTES.md's table of the CUDA kernels' traffic and predicted time (bf16, H100)."""
    from .cuda_emulation import Emulation

    emulation = Emulation()
    out = ["| shape | mode | CUDA plan (fwd) | W0 read | A read | L2 MB | HBM MB | predicted | F.linear | ratio |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, n, m, d, k, r, modes in HEADLINE_SHAPES:
        for mode in modes:
            l2, hbm, flop, ctas, plan = _fused_call(emulation, n, m, d, k, r, True)
            w0 = fused_traffic_budget(n, m, d, k, r, shared=False, forward=True, tile_rows=plan.tile_rows).weight
            a_read = plan.col_tiles * member_tiles(n, m, plan.tile_rows, False) * r * d
            seconds = _seconds(l2, hbm, flop, ctas)
            linear = _linear_seconds(n * m, d, k)
            if mode == "fwd_bwd":
                dl2, dhbm, dflop, dctas, _ = _fused_call(emulation, n, m, k, d, r, False)
                gl2, gflop, gctas = _grads_call(n, m, d, k, r)
                seconds += _seconds(dl2, dhbm, dflop, dctas) + _seconds(gl2, gl2, gflop, gctas)
                l2, hbm = l2 + dl2 + gl2, hbm + dhbm + gl2
                linear *= 2
            plan_text = (f"BM {plan.block_rows}, {plan.row_tiles}x{plan.col_tiles} tiles"
                         f"{f', split {plan.k_splits}' if plan.k_splits > 1 else ''}, {ctas} CTAs")
            out.append(f"| {label} | {mode} | {plan_text} | {w0 / (d * k):.0f}x | {a_read / (n * r * d):.0f}x "
                       f"| {l2 / 1e6:.0f} | {hbm / 1e6:.0f} | {seconds * 1e6:.0f} us | {linear * 1e6:.0f} us "
                       f"| {seconds / linear:.1f}x |")
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    print(headline_table())
