# Launch policies of the Triton kernels, in one place: the row tile of each kernel, how many members
# one pass of the stacked kernel's rank part holds, split-K of the stacked kernel, and how the
# weight-gradient reduction is split over rows. Pure functions of plain ints (rows, columns, members,
# rank, SM count), so that tests, the AOT gate and csrc/cuda/launch_policy.cuh (the CUDA kernels'
# policies, under the same names where a policy exists in both languages) can compare them without a
# GPU.
#
# Worked example, Llama-7B-class q_proj at decode (16 members x 1 row, d = k = 4096, rank 16):
#   block_rank(16) = 16; stacked_block_rows(1, 16, 16) = 16: the 16 stacked rows are ONE row tile,
#   so W0 is read once for all members; row_tile_members(1, 16, 16) = 16 members in that tile, and
#   rank_slots(1, 16, 16, 16) = 8: two passes of a [16, 8 * 16] rank block. One row tile x 32 column
#   tiles of POLICY_BLOCK_COLS leave most of 132 SMs idle: fused_k_splits(32, 4096, 64, 132) = 4
#   ranges of 1024 (the CUDA kernels' policy, same name), 128 programs.
# At 16 rows per member: stacked_block_rows(16, 16, 16) = 64 (4 members a tile, a [64, 64] block):
# W0 is read 4 times instead of 16. Prefill (512 rows per member): 128-row tiles inside one member.
# ViT-B/32 training (1600 rows per member): 128-row tiles over each member's rows on their own
# (member_tiles, 13 a member, the last one padded: 4% more rows), so that none straddles two members.
# Where the policy's tile needs a further rank pass (batch-1 ViT at rank 32: 64-row tiles of 3
# members, 2 slots), stacked_tilings also offers the policy at each halved tile (32 rows: 2 members,
# one pass), and the launcher runs the one of them the config model ranks cheapest among those whose
# configs do not all spill (kernels/configs.py, kernels/config_model.py).
"""Launch policies of the Triton kernels: row tiles, rank-part member slots, split-K of the stacked kernel,
weight-gradient row splits."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

__all__ = [
    "RowTiling",
    "GRAD_MIN_ROWS_PER_SPLIT",
    "GRAD_ROW_QUANTUM",
    "MAX_BLOCK_ROWS",
    "MEMBER_TILE_PADDING",
    "MIN_DOT_TILE",
    "POLICY_BLOCK_COLS",
    "RANK_BLOCK_ELEMENTS",
    "RANK_BLOCK_WIDTH",
    "FUSED_SPLIT_QUANTUM",
    "MAX_INNER_SPLITS",
    "MIN_INNER_PER_SPLIT",
    "block_rank",
    "fused_k_per_split",
    "fused_k_splits",
    "grad_row_splits",
    "grad_rows_per_split",
    "rank_passes",
    "rank_slots",
    "row_tile_cap",
    "row_tile_members",
    "shared_block_rows",
    "shared_rank_slots",
    "shared_tiling",
    "shared_tilings",
    "stacked_block_rows",
    "stacked_k_per_split",
    "stacked_row_tiles",
    "stacked_tiling",
    "stacked_tilings",
    "with_k_splits",
    "uses_member_tiles",
]

# A 16-bit tl.dot on NVIDIA needs every dimension >= 16 (the interpreter does not check it).
MIN_DOT_TILE = 16
MAX_BLOCK_ROWS = 128
# One pass's rank block [BLOCK_M, slots * BLOCK_R] (x A^T of the members a row tile holds, before
# each row keeps its own member's columns): at most this many fp32 elements and this many columns,
# e.g. [16, 128] at decode, [64, 64] at batch-1 ViT sizes. The width bounds the [BLOCK_K, width]
# shrink tile the K-loop loads beside the weight tile: 256 columns spilled kilobytes a thread where
# sizes and strides are not 16-divisible (no vector loads: one pointer register pair per element).
# A single member's [BLOCK_M, BLOCK_R] is always allowed (what the row caps of row_tile_cap keep from
# spilling).
RANK_BLOCK_ELEMENTS = 4096
RANK_BLOCK_WIDTH = 128
# The weight-gradient kernel splits its row reduction only when each range keeps at least this many
# rows, in ranges that end on a multiple of GRAD_ROW_QUANTUM (the Triton row tiles are 16-row
# multiples; the CUDA kernel's row tile is 32, hence its quantum of 32).
GRAD_MIN_ROWS_PER_SPLIT = 512
GRAD_ROW_QUANTUM = 16
# Where row tiles are at least a member long, the stacked kernel may tile each member's rows on their
# own (its last tile padded) instead of the stacked rows: then no tile straddles two members, so none
# needs the further rank pass whose second K-loop over in and shrink overflows the registers at rank
# tiles >= 32 (benchmarks/NOTES.md, "Compile-time reports"). Taken where the padding adds at most
# 1 / MEMBER_TILE_PADDING of the rows (always where the row tile divides the rows per member).
MEMBER_TILE_PADDING = 8
# The column tile the policies assume when they count a kernel's programs (the autotuner picks the
# real one; 128 is the widest tile most configs run).
POLICY_BLOCK_COLS = 128
# Split-K of the stacked kernel (as the CUDA kernels' kMinInnerPerSplit, kMaxInnerSplits): each range
# reduces at least MIN_INNER_PER_SPLIT elements, at most MAX_INNER_SPLITS ranges, each a multiple of
# FUSED_SPLIT_QUANTUM (the largest BLOCK_K of the candidates, so whole K steps under any config).
MIN_INNER_PER_SPLIT = 128
MAX_INNER_SPLITS = 16
FUSED_SPLIT_QUANTUM = 64


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _floor_power_of_2(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n >= 1 else 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_rank(rank: int) -> int:
    """Rank tile: the next power of two >= ``rank``, at least 16 (tensor-core minimum); masked."""
    return max(MIN_DOT_TILE, _next_power_of_2(rank))


def row_tile_cap(block_r: int, shared_rows: bool = False, tf32x3: bool = False) -> int:
    """Largest row tile before ptxas runs out of registers (``python -m lora_ensemble.kernels.aot``
    on sm_80 and sm_90): 64 for a rank tile above 64, the shared-input kernel (it holds the base
    tile and a member's output) and 3xTF32 dots (every operand split in two); 32 for 3xTF32 at a
    rank tile above 32 and for the shared-input kernel above 64; 16 for both at once."""
    cap = MAX_BLOCK_ROWS // 2 if (block_r > 64 or shared_rows or tf32x3) else MAX_BLOCK_ROWS
    if (tf32x3 and block_r > 32) or (shared_rows and block_r > 64):
        cap = MAX_BLOCK_ROWS // 4
    if tf32x3 and shared_rows and block_r > 64:
        cap = MIN_DOT_TILE
    return cap


def row_tile_members(rows_per_member: int, block_m: int, members: int) -> int:
    """The most members one row tile of the stacked rows ``[members * rows_per_member]`` spans
    (tiles start at multiples of ``block_m``; rows are member-major): 1 when ``block_m`` divides
    ``rows_per_member``, ``block_m / rows_per_member`` when that divides ``block_m``."""
    m = max(rows_per_member, 1)
    last_start = m - math.gcd(block_m, m)  # the latest offset in a member a tile can start at
    return max(1, min(members, (last_start + block_m - 1) // m + 1))


def _most_slots(block_m: int, block_r: int) -> int:
    """Members one pass's rank block may hold: within RANK_BLOCK_ELEMENTS and RANK_BLOCK_WIDTH."""
    return max(1, _floor_power_of_2(min(RANK_BLOCK_ELEMENTS // block_m, RANK_BLOCK_WIDTH) // block_r))


def _one_pass_fits(block_m: int, block_r: int, members_in_tile: int) -> bool:
    return _next_power_of_2(members_in_tile) <= _most_slots(block_m, block_r)


def stacked_block_rows(rows_per_member: int, members: int, block_r: int, tf32x3: bool = False) -> int:
    """Row tile of the stacked kernel (forward and dx) over the ``members * rows_per_member`` stacked
    rows: the per-member tile (the next power of two >= the rows per member, 16 to the cap), or a
    larger one that spans several members when their rank parts fit one pass
    (:data:`RANK_BLOCK_ELEMENTS`, :data:`RANK_BLOCK_WIDTH`): fewer row tiles, so fewer reads of W0."""
    cap = row_tile_cap(block_r, False, tf32x3)
    per_member = min(cap, max(MIN_DOT_TILE, _next_power_of_2(rows_per_member)))
    block_m = per_member
    limit = min(cap, max(MIN_DOT_TILE, _next_power_of_2(members * rows_per_member)))
    while block_m * 2 <= limit and _one_pass_fits(
            block_m * 2, block_r, row_tile_members(rows_per_member, block_m * 2, members)):
        block_m *= 2
    return block_m


def uses_member_tiles(rows_per_member: int, block_m: int) -> bool:
    """Whether the stacked kernel tiles each member's rows on their own (``cdiv(rows_per_member,
    block_m)`` tiles a member, none straddling two): tiles at least a member long whose padding adds
    at most 1 / :data:`MEMBER_TILE_PADDING` of the rows."""
    padded = _cdiv(rows_per_member, block_m) * block_m
    return rows_per_member >= block_m and padded * MEMBER_TILE_PADDING <= rows_per_member * (MEMBER_TILE_PADDING + 1)


def rank_slots(rows_per_member: int, block_m: int, block_r: int, members: int) -> int:
    """Members one pass of the stacked kernel's rank part holds (a power of two): every member a row
    tile spans when they fit the rank block's bounds, else as many as fit (the others in more
    passes, :func:`rank_passes`). Where tiles are at least a member long a tile straddles at most two
    members: two slots where the rank block holds them (one pass: the further pass's second K-loop
    is what overflows the registers), else one and a further pass for the straddling tiles' second
    member. (Long members, whose tiles seldom straddle, get member tiles instead: :func:`stacked_tiling`.)"""
    if rows_per_member >= block_m:
        straddles = members > 1 and rows_per_member % block_m != 0
        return 2 if straddles and _most_slots(block_m, block_r) >= 2 else 1
    spanned = _next_power_of_2(row_tile_members(rows_per_member, block_m, members))
    return min(spanned, _most_slots(block_m, block_r))


def rank_passes(members_in_tile: int, slots: int) -> int:
    """Passes of the rank part for a tile holding ``members_in_tile`` members, ``slots`` at a time."""
    return _cdiv(members_in_tile, slots)


def shared_block_rows(rows: int, cols: int, block_r: int, sm_count: int, tf32x3: bool = False) -> int:
    """Row tile of the shared-input kernels (forward and dx; one program computes the base tile once
    for every member): the next power of two >= ``rows`` up to the cap, or 16 rows when the
    ``[block_m, POLICY_BLOCK_COLS]`` output tiles would leave SMs idle (batch-1 sizes): more, narrower programs
    instead of member groups that would each recompute the base."""
    cap = row_tile_cap(block_r, True, tf32x3)
    block_m = min(cap, max(MIN_DOT_TILE, _next_power_of_2(rows)))
    if _cdiv(rows, block_m) * _cdiv(cols, POLICY_BLOCK_COLS) < sm_count:
        return MIN_DOT_TILE
    return block_m


def shared_rank_slots(block_m: int, block_r: int, members: int) -> int:
    """Members one pass of the shared-input forward's rank part holds (every row needs every member):
    all of them when they fit the rank block's bounds, else as many as fit."""
    return min(_next_power_of_2(members), _most_slots(block_m, block_r))


def fused_k_splits(programs: int, inner: int, block_k: int, sm_count: int) -> int:
    """Split-K of a fused launch (the CUDA kernels' policy of the same name): 1 while its ``programs``
    fill half the ``sm_count`` SMs or more; else as many ranges of the reduction as keep the programs
    within one wave, each at least :data:`MIN_INNER_PER_SPLIT` long and whole ``block_k`` steps. The
    ranges are summed in order by the last program of each tile: deterministic."""
    splits = min(sm_count // max(programs, 1), inner // MIN_INNER_PER_SPLIT, MAX_INNER_SPLITS)
    if splits <= 1:
        return 1
    return _cdiv(inner, fused_k_per_split(inner, splits, block_k))


def fused_k_per_split(inner: int, splits: int, block_k: int) -> int:
    """Length of each range of a split-K over ``inner`` (a multiple of ``block_k``; the last may be
    shorter, none is empty)."""
    return inner if splits <= 1 else _cdiv(_cdiv(inner, splits), block_k) * block_k


def stacked_k_per_split(inner: int, tiling: RowTiling) -> int:
    """Length of each range of the stacked kernel's split-K under ``tiling`` (:func:`with_k_splits`)."""
    return fused_k_per_split(inner, tiling.k_splits, FUSED_SPLIT_QUANTUM)


def with_k_splits(tiling: RowTiling, rows_per_member: int, members: int, inner: int, cols: int,
                  sm_count: int) -> RowTiling:
    """``tiling`` with the stacked kernel's split-K (:func:`fused_k_splits` of its row tiles x
    ``POLICY_BLOCK_COLS`` column tiles, in :data:`FUSED_SPLIT_QUANTUM` steps): decode and small batches,
    whose output tiles leave SMs idle, split the reduction instead (the kernel with a weight only)."""
    programs = stacked_row_tiles(rows_per_member, members, tiling) * _cdiv(cols, POLICY_BLOCK_COLS)
    return tiling._replace(k_splits=fused_k_splits(programs, inner, FUSED_SPLIT_QUANTUM, sm_count))


def grad_row_splits(rows: int, programs_per_split: int, sm_count: int, deterministic: bool) -> int:
    """How many row ranges the weight-gradient reduction is split into: 1 (deterministic) unless the
    (member, column tile) programs alone leave SMs idle (fewer than two per SM) and every range keeps
    at least :data:`GRAD_MIN_ROWS_PER_SPLIT` rows; always 1 under deterministic algorithms."""
    if deterministic:
        return 1
    wanted = _cdiv(2 * sm_count, max(programs_per_split, 1))
    return max(1, min(wanted, rows // GRAD_MIN_ROWS_PER_SPLIT))


def grad_rows_per_split(rows: int, splits: int) -> int:
    """Rows each split reduces: an equal share rounded up to :data:`GRAD_ROW_QUANTUM`."""
    return _cdiv(_cdiv(max(rows, 1), max(splits, 1)), GRAD_ROW_QUANTUM) * GRAD_ROW_QUANTUM


class RowTiling(NamedTuple):
    """The row tile of a fused kernel and its rank part: ``rank_slots`` members a pass, whether some
    tile needs more than one pass (``multi_pass``: the kernel compiles the pass loop), and whether the
    stacked kernel tiles each member's rows on their own (``member_tiles``, :func:`uses_member_tiles`),
    and into how many ranges the stacked kernel splits its reduction (``k_splits``, :func:`with_k_splits`)."""

    block_m: int
    rank_slots: int
    multi_pass: bool
    member_tiles: bool = False
    k_splits: int = 1


def _stacked_tiling_at(rows_per_member: int, members: int, block_r: int, block_m: int) -> RowTiling:
    padded_rows = members * _cdiv(rows_per_member, block_m) * block_m  # the kernel counts them in int32
    if uses_member_tiles(rows_per_member, block_m) and padded_rows < 2**31:
        return RowTiling(block_m, 1, False, True)
    slots = rank_slots(rows_per_member, block_m, block_r, members)
    return RowTiling(block_m, slots, row_tile_members(rows_per_member, block_m, members) > slots)


@functools.lru_cache(maxsize=4096)
def stacked_tiling(rows_per_member: int, members: int, block_r: int, tf32x3: bool = False) -> RowTiling:
    """The stacked kernel's :class:`RowTiling` (forward and dx): the row tile of
    :func:`stacked_block_rows`, member tiles where :func:`uses_member_tiles`, else
    :func:`rank_slots` members a pass."""
    block_m = stacked_block_rows(rows_per_member, members, block_r, tf32x3)
    return _stacked_tiling_at(rows_per_member, members, block_r, block_m)


@functools.lru_cache(maxsize=4096)
def stacked_tilings(rows_per_member: int, members: int, block_r: int, tf32x3: bool = False) -> tuple[RowTiling, ...]:
    """The stacked kernel's tilings to choose from (cached: the launcher asks per launch key):
    :func:`stacked_tiling` and, where it needs a further rank pass, the same policy at each smaller
    row tile down to :data:`MIN_DOT_TILE` (more reads of W0, fewer members a tile: fewer passes, one,
    or member tiles). The further pass (a second K-loop over x and A, in every column tile) is what
    spills (``benchmarks/NOTES.md``), so the launcher takes, of the tilings whose configs do not all
    spill (``configs.unspilled_tilings``), the one the config model ranks cheapest
    (``config_model.cheapest_tiling``). Where the policy's tiling is one pass the model ranks it
    first at every shape tabled in NOTES, so it is the only one."""
    first = stacked_tiling(rows_per_member, members, block_r, tf32x3)
    if not first.multi_pass:
        return (first,)
    return (first, *(_stacked_tiling_at(rows_per_member, members, block_r, block_m)
                     for block_m in _smaller_row_tiles(first.block_m)))


def _smaller_row_tiles(block_m: int) -> list[int]:
    """The row tiles below ``block_m``, halving down to :data:`MIN_DOT_TILE`."""
    return [block_m >> halvings for halvings in range(1, (block_m // MIN_DOT_TILE).bit_length())]


def stacked_row_tiles(rows_per_member: int, members: int, tiling: RowTiling) -> int:
    """Row tiles of a stacked launch: ``cdiv(members * rows_per_member, block_m)`` over the stacked
    rows, or ``members * cdiv(rows_per_member, block_m)`` with :attr:`RowTiling.member_tiles`."""
    if tiling.member_tiles:
        return members * _cdiv(rows_per_member, tiling.block_m)
    return _cdiv(members * rows_per_member, tiling.block_m)


@functools.lru_cache(maxsize=4096)
def shared_tiling(rows: int, cols: int, members: int, block_r: int, sm_count: int, tf32x3: bool = False,
                  sum_members: bool = False) -> RowTiling:
    """The shared-input kernel's :class:`RowTiling`: the forward's rank passes hold
    :func:`shared_rank_slots` members; the dx (``sum_members``) runs one member a pass."""
    block_m = shared_block_rows(rows, cols, block_r, sm_count, tf32x3)
    return _shared_tiling_at(block_m, block_r, members, sum_members)


@functools.lru_cache(maxsize=4096)
def shared_tilings(rows: int, cols: int, members: int, block_r: int, sm_count: int, tf32x3: bool = False,
                   sum_members: bool = False) -> tuple[RowTiling, ...]:
    """The shared-input kernel's tilings to choose from, as :func:`stacked_tilings`:
    :func:`shared_tiling` and, where it needs further passes, the same at each smaller row tile (more
    members a pass in the forward; in the dx, one member a pass at any tile, a smaller member sum)."""
    first = shared_tiling(rows, cols, members, block_r, sm_count, tf32x3, sum_members)
    if not first.multi_pass:
        return (first,)
    return (first, *(_shared_tiling_at(block_m, block_r, members, sum_members)
                     for block_m in _smaller_row_tiles(first.block_m)))


def _shared_tiling_at(block_m: int, block_r: int, members: int, sum_members: bool) -> RowTiling:
    slots = 1 if sum_members else shared_rank_slots(block_m, block_r, members)
    return RowTiling(block_m, slots, members > slots)
