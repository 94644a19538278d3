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
six headline shapes on an H100 (132 SMs), the elements and bytes each operand is read, and a
roofline prediction of the device time.
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


# The six headline shapes: (label, N, rows per member, d, k, r, shared input, modes).
HEADLINE_SHAPES = [
    ("ViT-B/32 N16 r8, batch 1 (50 rows)", 16, 50, 768, 768, 8, False, ("fwd", "fwd_bwd")),
    ("ViT-B/32 N16 r8, batch 32 (1600 rows)", 16, 1600, 768, 768, 8, False, ("fwd", "fwd_bwd")),
    ("q_proj 4096^2 N16 r16, decode (1 row)", 16, 1, 4096, 4096, 16, False, ("fwd",)),
    ("q_proj 4096^2 N16 r16, 16 rows", 16, 16, 4096, 4096, 16, False, ("fwd",)),
    ("q_proj 4096^2 N16 r16, prefill (512 rows)", 16, 512, 4096, 4096, 16, False, ("fwd",)),
]


def _headline_table() -> str:  # pragma: no cover - a report, run by hand
    import torch

    from .cuda_emulation import Emulation

    emulation = Emulation()
    lines = []
    for label, n, m, d, k, r, shared, modes in HEADLINE_SHAPES:
        for forward in (True, False) if "fwd_bwd" in modes else (True,):
            inner, cols = (d, k) if forward else (k, d)
            plan = emulation.plan(torch.bfloat16, forward, n, m, inner, cols, r, shared)
            budget = fused_traffic_budget(n, m, inner, cols, r, shared=shared, forward=forward,
                                          tile_rows=plan.tile_rows)
            exact_pairs = member_tiles(n, m, plan.tile_rows, shared)
            col_tiles = math.ceil(cols / 128)
            shrink = col_tiles * exact_pairs * r * inner
            expand = exact_pairs * cols * r
            role = "fwd" if forward else "dx"
            lines.append(f"{label:42s} {role:3s} BM{plan.block_rows} tile_rows {plan.tile_rows} "
                         f"tiles {plan.row_tiles}x{plan.col_tiles} splits {plan.k_splits}: W0 {budget.weight:,} "
                         f"({budget.weight / (inner * cols):.1f}x) in {budget.inp:,} shrink {shrink:,} "
                         f"expand {expand:,}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(_headline_table())
