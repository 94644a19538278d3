# What one launch of each Triton kernel of this package is to the config cost model
# (kernels/config_model.py): a GemmLaunch built from plain ints and the launch policy's tiling
# (kernels/launch_policy.py). The launcher's tuner ranks a tuning key's candidate configs with it
# (kernels/launcher.py: only the best few are compiled and timed), and auto's cost model adds up a
# backend's launches with it (lora_ensemble/auto_costs.py).
#
# Stacked kernel (forward: in = x, K = d, C = k; dx: in = dy, K = k, C = d): T = cdiv(N*M, BLOCK_M)
# row tiles over the stacked rows (a tile may hold several members; with member tiles N * cdiv(M,
# BLOCK_M) tiles of one member each), the rank block [BLOCK_M,
# RANK_SLOTS * BLOCK_R] computed in the base K loop, one more K loop over it for each further pass a
# tile needs, one [BLOCK_M, BLOCK_R] x [BLOCK_R, BN] expand dot per member a tile holds (a config's
# column group, COL_TILES, is the config model's to count: the rank block once for its tiles). Per-program
# counts are averages over the T tiles (kernels/fused_lora_gemm.py's header: sum_t S_t members held,
# sum_t ceil(S_t / RANK_SLOTS) passes). Split-K (RowTiling.k_splits = S > 1): S programs a tile, each
# reducing k_per_split, its passes and expands included, and the fp32 sums of every range written and
# read back once (the last program of a tile adds them up).
# Shared-input forward: cdiv(M, BLOCK_M) row tiles, the base once with the first pass's rank block,
# further passes for the members beyond RANK_SLOTS, one expand per member, two live accumulators.
# Shared-input dx: the member sum of dy in the base K loop (N row-operand tiles a step), then one K
# loop and one expand per member. Weight gradients: a [BLOCK_R, BLOCK_C] tile of dA or dB^T per
# (member, row split), reducing the split's rows.
"""The config cost model's view of the package's Triton kernel launches (GemmLaunch builders)."""

from __future__ import annotations

from .config_model import GemmLaunch
from .launch_policy import RowTiling, stacked_k_per_split, stacked_row_tiles

__all__ = ["TRITON_EFFICIENCY", "lora_grads_launch", "shared_launch", "split_k_partial_floats", "stacked_launch",
           "stacked_tile_members"]

# The fraction of the tensor-core peak the package's Triton dots reach (a guess until a GPU measures it).
TRITON_EFFICIENCY = 0.8

# Beyond this many row tiles the members held per tile are counted from the bound (N + T - 1)
# instead of tile by tile.
_MAX_COUNTED_TILES = 1 << 16


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dot_key(precision: str, element_size: int) -> str:
    """The config model's dot rate (``GpuSpec.dot_flops``) of a kernel's dots: 16-bit inputs run
    16-bit tensor-core dots whatever ``precision`` the kernel names (``configs.dot_precision`` gives
    "tf32" for them: exact products accumulated in fp32)."""
    return "16bit" if element_size == 2 else precision


def stacked_tile_members(members: int, rows: int, tiling: RowTiling) -> tuple[int, int, int]:
    """``(T, sum_t S_t, sum_t passes_t)`` of the stacked kernel over ``members * rows`` rows under
    ``tiling``: the row tiles (:func:`~.launch_policy.stacked_row_tiles`), the members they hold (one
    (tile, member) pair per member with rows in the tile) and the rank passes they run
    (``ceil(S_t / rank_slots)`` each). With member tiles every tile holds one member in one pass."""
    rows = max(rows, 1)
    tiles = stacked_row_tiles(rows, members, tiling)
    if tiling.member_tiles:
        return tiles, tiles, tiles
    if tiles > _MAX_COUNTED_TILES:
        held = members + tiles - 1
        return tiles, held, max(tiles, _cdiv(held, tiling.rank_slots))
    held = passes = 0
    block_m, stacked = tiling.block_m, members * rows
    for start in range(0, stacked, block_m):
        span = (min(start + block_m, stacked) - 1) // rows - start // rows + 1
        held += span
        passes += _cdiv(span, tiling.rank_slots)
    return tiles, held, passes


def split_k_partial_floats(members: int, rows: int, cols: int, rank: int, splits: int) -> int:
    """fp32 elements of the stacked split-K kernel's workspace ``partial``: the ``splits`` ranges' sums
    [S, N*M, C], then their rank blocks [S, N*M, R] (the launcher allocates it per call)."""
    return splits * members * rows * (cols + rank)


def stacked_launch(members: int, rows: int, inner: int, cols: int, rank: int, block_r: int, tiling: RowTiling,
                   precision: str, element_size: int, has_weight: bool = True, has_base: bool = False,
                   efficiency: float = TRITON_EFFICIENCY) -> GemmLaunch:
    """One stacked fused launch (forward or dx) of ``members`` x ``rows`` rows, ``inner`` -> ``cols``,
    rank ``rank`` (tile ``block_r``) under ``tiling``, in ``element_size``-byte inputs."""
    e = element_size
    tiles, held, passes = stacked_tile_members(members, rows, tiling)
    stacked = members * rows
    dram = (e * (stacked * inner + (inner * cols if has_weight else 0) + members * rank * (inner + cols)
                 + stacked * cols * (2 if has_base else 1)) + 4 * stacked * rank)
    splits = tiling.k_splits
    if splits > 1:  # each range's fp32 sums and rank blocks, written and read back
        dram += 2 * 4 * split_k_partial_floats(members, rows, cols, rank, splits)
    return GemmLaunch(
        tile_rows=tiling.block_m, row_tiles=tiles * splits, cols=cols,
        inner=stacked_k_per_split(inner, tiling), precision=_dot_key(precision, e),
        lhs_bytes=e, rhs_bytes=e, dram_bytes=dram, column_operand=has_weight, rank_tile=tiling.rank_slots * block_r,
        rank_loops=(passes - tiles) / tiles, expands=held / tiles, expand_rank=block_r,
        expand_passes=2 if e == 2 else 1, efficiency=efficiency)


def shared_launch(members: int, rows: int, inner: int, cols: int, rank: int, block_r: int, tiling: RowTiling,
                  precision: str, element_size: int, sum_members: bool, has_weight: bool = True,
                  has_base: bool = False, efficiency: float = TRITON_EFFICIENCY) -> GemmLaunch:
    """One shared-input fused launch: the forward (``rows`` shared rows, every member's output) or,
    with ``sum_members``, the dx (``dy [N, M, K]`` in, ``dx [M, C]`` out)."""
    e = element_size
    tiles = _cdiv(rows, tiling.block_m)
    in_rows = members * rows if sum_members else rows
    out_rows = rows if sum_members else members * rows
    dram = (e * (in_rows * inner + (inner * cols if has_weight else 0) + members * rank * (inner + cols)
                 + out_rows * cols + (rows * cols if has_base else 0)) + 4 * members * rows * rank)
    if sum_members:  # the member sum in the base loop, then one K loop per member
        rank_tile, rank_in_main, rank_loops = block_r, False, members
    else:
        rank_tile, rank_in_main = tiling.rank_slots * block_r, True
        rank_loops = _cdiv(members, tiling.rank_slots) - 1
    return GemmLaunch(
        tile_rows=tiling.block_m, row_tiles=tiles, cols=cols, inner=inner, precision=_dot_key(precision, e),
        lhs_bytes=e, rhs_bytes=e, dram_bytes=dram, column_operand=has_weight, rank_tile=rank_tile,
        rank_in_main=rank_in_main, rank_loops=rank_loops, lhs_loads=members if sum_members else 1,
        output_tiles=1 if sum_members else 2, expands=members, expand_rank=block_r, expand_passes=2 if e == 2 else 1,
        efficiency=efficiency)


def lora_grads_launch(members: int, rows: int, d: int, k: int, rank: int, block_r: int, splits: int,
                      rows_per_split: int, precision: str, element_size: int, shared_input: bool = False,
                      efficiency: float = TRITON_EFFICIENCY) -> GemmLaunch:
    """The weight-gradient launch: ``dA [N, R, d]`` and ``dB^T [N, R, k]`` tiles per member and row
    split, each reducing ``rows_per_split`` rows of the fp32 rank products against ``x`` (``[M, d]``
    with ``shared_input``) and ``dy``."""
    e = element_size
    x_rows = rows if shared_input else members * rows
    dram = 2 * 4 * members * rows * rank + e * (x_rows * d + members * rows * k) + 4 * members * rank * (d + k)
    return GemmLaunch(
        tile_rows=block_r, row_tiles=members * splits, cols=d + k, inner=rows_per_split,
        precision=_dot_key(precision, e), lhs_bytes=4, rhs_bytes=e, dram_bytes=dram, dot_passes=2 if e == 2 else 1,
        efficiency=efficiency, col_tile="BLOCK_C", inner_tile="BLOCK_M")
