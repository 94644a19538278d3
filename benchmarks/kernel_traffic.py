"""What the fused kernels read, tile by tile, and what that predicts for an H100 before any GPU run.

:func:`fused_kernel_traffic` counts the elements one launch of the Triton forward or dx kernel
(``kernels/fused_lora_gemm.py``) loads from each operand role: ``weight`` (W0), ``in`` (x, or dy
in the dx), ``shrink`` (A, or B) and ``expand`` (B, or A); :func:`lora_grads_traffic` the same for
the weight-gradient kernel. ``tests/test_kernel_traffic.py`` checks both load by load under the
Triton interpreter. :func:`traffic_budget` is the bound the design promises any fused kernel,
Triton or CUDA, for its own tile sizes: W0 once per row tile of a plain GEMM over the N*M stacked
rows (so once at decode), A re-read once per column tile, B once.

``python -m benchmarks.kernel_traffic`` prints, for the headline shapes, each launch's traffic per
operand, its L2 and HBM bytes, its tensor-core work (masked rank columns and padded rows included)
and a predicted H100 device time next to ``F.linear``'s and the composite's (the ``torch``
backend), from the constants of :data:`H100`: guesses, labelled as such in ``benchmarks/NOTES.md``,
for a GPU run to prove or refute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_ensemble.kernels.configs import (
    FALLBACK_FUSED_LORA_GEMM_CONFIG,
    FUSED_LORA_GEMM_GPU_CONFIGS,
    FUSED_LORA_GEMM_SPLIT_K_GPU_CONFIGS,
    column_group,
)
from lora_ensemble.kernels.fused_lora_gemm import fused_tiling
from lora_ensemble.kernels.gpu_specs import H100_SXM
from lora_ensemble.kernels.launch_policy import (
    MEMBER_TILE_PADDING,
    RowTiling,
    block_rank,
    grad_row_splits,
    stacked_row_tiles,
)

__all__ = ["H100", "HEADLINE_SHAPES", "fused_kernel_traffic", "h100_stacked_tiling", "kept_column_tiles",
           "lora_grads_traffic", "main", "traffic_budget"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _column_groups(cols: int, block_n: int, col_group: int) -> tuple[int, int]:
    """(column groups, column tiles run): the groups of ``col_group`` tiles of ``block_n`` columns
    that cover ``cols``, whole groups run."""
    groups = _cdiv(_cdiv(cols, block_n), col_group)
    return groups, groups * col_group


def _stacked_tiles(members: int, rows: int, block_m: int, member_tiles: bool = False):
    """``(start, end, first member, last member)`` of each row tile of the stacked rows (with
    ``member_tiles``, of each member's rows on their own)."""
    if member_tiles:
        for member in range(members):
            for start in range(member * rows, (member + 1) * rows, block_m):
                yield start, min(start + block_m, (member + 1) * rows), member, member
        return
    stacked = members * rows
    for start in range(0, stacked, block_m):
        end = min(start + block_m, stacked)
        yield start, end, start // rows, (end - 1) // rows


def fused_kernel_traffic(members: int, rows: int, inner: int, cols: int, rank: int, block_m: int, block_n: int,
                         rank_slots: int, shared_input: bool = False, sum_members: bool = False,
                         member_tiles: bool = False, col_group: int = 1, k_splits: int = 1) -> dict[str, int]:
    """Elements one launch of the fused Triton kernel loads from each operand role, tile by tile as
    ``kernels/fused_lora_gemm.py`` runs (its header states the same totals): ``members`` x ``rows``
    rows of ``inner`` (K) in, ``cols`` (C) out, row tile ``block_m``, column tile ``block_n``,
    ``rank_slots`` members a rank pass and ``member_tiles`` (the launch policy's ``RowTiling``), and
    the stacked kernel's column groups of ``col_group`` tiles (the config's ``COL_TILES``: the rank
    block, so the shrink's reads, once per group). Layouts: stacked (forward and dx), ``shared_input``
    forward, ``sum_members`` (the shared-input dx). With ``k_splits`` ranges of the reduction (the
    stacked split-K kernel) W0, in and shrink are read as without (each range its part), the expand
    once per range, and ``"partial"`` counts what the tiles' last programs read back: every range's
    fp32 sums and rank blocks.

    Rows and columns past the edge wrap around (a tile loads ``min(block_m, rows)`` distinct rows
    and ``min(block_n, cols)`` distinct columns, a group's tiles past the edge their wrapped columns);
    rank columns past ``rank`` and slots past a tile's members are masked (no traffic)."""
    k, c, r = inner, cols, rank
    groups, col_tiles = _column_groups(c, block_n, col_group)
    strip = col_tiles * min(block_n, c)  # weight columns loaded per row tile, over its column tiles
    if shared_input or sum_members:
        row_tiles = _cdiv(rows, block_m)
        tile_rows = min(block_m, rows)
        in_reads = (2 * members if sum_members else _cdiv(members, rank_slots)) * tile_rows * k
        return {"weight": row_tiles * strip * k, "in": row_tiles * col_tiles * in_reads,
                "shrink": row_tiles * col_tiles * members * r * k, "expand": row_tiles * members * r * c}
    tile_rows = min(block_m, rows if member_tiles else members * rows)  # rows a tile loads, wrapped
    traffic = {"weight": 0, "in": 0, "shrink": 0, "expand": 0}
    for start, end, first, last in _stacked_tiles(members, rows, block_m, member_tiles):
        span = last - first + 1
        later_rows = max(0, end - max(start, (first + rank_slots) * rows))  # rows of further passes
        traffic["weight"] += strip * k
        traffic["in"] += col_tiles * (tile_rows + later_rows) * k
        traffic["shrink"] += groups * span * r * k
        traffic["expand"] += k_splits * span * r * c
    if k_splits > 1:
        traffic["partial"] = k_splits * members * rows * (c + r)
    return traffic


def lora_grads_traffic(members: int, rows: int, d: int, k: int, rank: int, block_c: int) -> dict[str, int]:
    """Elements one launch of the weight-gradient kernel (``kernels/lora_grads.py``) loads: x and dy
    once (every column tile of dA and dB reads its own columns), the fp32 rank products dyb and xa
    once per column tile of dA and dB."""
    rows_all = members * rows
    return {"x": rows_all * d, "dy": rows_all * k, "dyb": _cdiv(d, block_c) * rows_all * rank,
            "xa": _cdiv(k, block_c) * rows_all * rank}


def traffic_budget(members: int, rows: int, inner: int, cols: int, rank: int, block_m: int, block_n: int,
                   shared_input: bool = False, sum_members: bool = False, member_tiles: bool = False) -> dict[str, int]:
    """The most elements a fused kernel with ``block_m`` x ``block_n`` output tiles may load from
    each operand role per launch (the design's promise; :func:`fused_kernel_traffic` is what the
    Triton kernel loads):

    - ``weight`` (W0): once per row tile of a plain GEMM over the stacked rows with the same
      ``block_m`` (``T = cdiv(N*M, block_m)`` tiles; ``cdiv(M, block_m)`` with a shared input),
      in whole column tiles: 1x W0 at decode (16 x 1 rows, 8 x 2 rows, one 16-row tile); with
      ``member_tiles`` (each member's rows tiled on their own, the last tile padded) at most
      1 / ``MEMBER_TILE_PADDING`` more, the padding the launch policy allows;
    - ``in``: each column tile reads its rows, at most twice (once more for further rank passes);
      with a shared input once per pass (at most N), and the dx twice per member;
    - ``shrink``: recomputed in every column tile (``P = cdiv(C, block_n)``), once per member a row
      tile holds (at most ``N + T - 1`` over the stacked tiles; every member in a shared tile);
    - ``expand``: once per member a row tile holds, over all columns."""
    k, c, r = inner, cols, rank
    col_tiles = _cdiv(c, block_n)
    strip = col_tiles * min(block_n, c) * k
    if shared_input or sum_members:
        row_tiles = _cdiv(rows, block_m)
        tile_rows = min(block_m, rows)
        return {"weight": row_tiles * strip,
                "in": row_tiles * col_tiles * (2 if sum_members else 1) * members * tile_rows * k,
                "shrink": row_tiles * col_tiles * members * r * k, "expand": row_tiles * members * r * c}
    row_tiles = _cdiv(members * rows, block_m)
    members_held = members + row_tiles - 1
    weight_tiles = row_tiles + (row_tiles // MEMBER_TILE_PADDING if member_tiles else 0)
    return {"weight": weight_tiles * strip, "in": 2 * weight_tiles * col_tiles * min(block_m, members * rows) * k,
            "shrink": col_tiles * members_held * r * k, "expand": members_held * r * c}


@dataclass(frozen=True)
class DeviceModel:
    """The constants of a predicted device time: each launch costs ``launch_us`` plus the longest of
    its HBM bytes over ``hbm_bytes_per_s`` (scaled down while fewer than half the SMs have a
    program: one SM cannot keep enough loads in flight), its L2 bytes over ``l2_bytes_per_s``, and
    its tensor-core FLOPs over the rate of its row tile (``triton_flops_per_s``; cuBLAS:
    ``cublas_flops_per_s``)."""

    sms: int
    hbm_bytes_per_s: float
    l2_bytes_per_s: float
    cublas_flops_per_s: float
    triton_flops_per_s: dict[int, float]
    launch_us: float

    def seconds(self, hbm: float, l2: float, flops: float, flops_per_s: float, programs: int) -> float:
        parallel = min(1.0, programs / (self.sms / 2))
        return self.launch_us * 1e-6 + max(hbm / (self.hbm_bytes_per_s * parallel), l2 / self.l2_bytes_per_s,
                                           flops / flops_per_s)


# H100 SXM, bf16. Measured here earlier: ~3.0 TB/s HBM, ~798 TFLOP/s at 8192^3 (NOTES). Guesses:
# L2 ~10 TB/s (5.5-7 measured on the 114-SM PCIe H100 by chips and cheese, ~12 quoted for SXM);
# cuBLAS ~650 TFLOP/s at these sizes; Triton's pointer-based dots at 80% of that with 128-row tiles
# (wgmma), less with 64, and mma.sync at about a third of the peak below 64 rows; 2.5 µs a launch
# (device time of an almost empty kernel, L2 flushed).
H100 = DeviceModel(sms=132, hbm_bytes_per_s=3.0e12, l2_bytes_per_s=10.0e12, cublas_flops_per_s=650e12,
                   triton_flops_per_s={128: 520e12, 64: 430e12, 32: 280e12, 16: 250e12}, launch_us=2.5)

# label, members, rows per member, d, k, rank, modes: the shapes issue 21 decides the design on.
HEADLINE_SHAPES = (
    ("vit_b32_batch1", 16, 50, 768, 768, 8, ("fwd", "fwd_bwd")),
    ("vit_b32_batch32", 16, 1600, 768, 768, 8, ("fwd", "fwd_bwd")),
    ("llama_q_decode", 16, 1, 4096, 4096, 16, ("fwd",)),
    ("llama_q_16_rows", 16, 16, 4096, 4096, 16, ("fwd",)),
    ("llama_q_prefill", 16, 512, 4096, 4096, 16, ("fwd",)),
)
def h100_stacked_tiling(n: int, m: int, inner: int, cols: int, r: int) -> tuple[RowTiling, list]:
    """The row tiling and the configs the launcher runs a stacked bf16 launch (``inner`` -> ``cols``)
    with on an H100, in the AOT gate's "aligned" specialisation (the headline widths are multiples of
    16): ``fused_lora_gemm.fused_tiling``, of the launch policy's tilings whose configs do not all
    spill, the one the config model ranks cheapest."""
    tiling, configs, _ = fused_tiling(list(FUSED_LORA_GEMM_GPU_CONFIGS), False, m, n, inner, cols, r, torch.bfloat16,
                                      "tf32", H100_SXM, H100_SXM.sm_count,
                                      split_k_configs=list(FUSED_LORA_GEMM_SPLIT_K_GPU_CONFIGS))
    return tiling, configs


def _columns(config) -> tuple[int, int]:
    return config.kwargs["BLOCK_N"], column_group(config)


def kept_column_tiles(n: int, m: int, d: int, k: int, r: int, mode: str) -> list[tuple[int, int]]:
    """The column tiles (BLOCK_N) and column groups (COL_TILES) of the bf16 configs the run-time
    pruning keeps on an H100 for the forward and, with ``mode="fwd_bwd"``, also for the dx kernel
    (the spill record included): the tilings a prediction may assume the autotuner picks from."""
    roles = [(d, k)] + ([(k, d)] if mode == "fwd_bwd" else [])
    kept = None
    for inner, cols in roles:
        cols_kept = {_columns(c) for c in h100_stacked_tiling(n, m, inner, cols, r)[1]}
        kept = cols_kept if kept is None else kept & cols_kept
    return sorted(kept) or [_columns(FALLBACK_FUSED_LORA_GEMM_CONFIG)]


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a mode: bytes per operand read and written, where from, and its work."""

    name: str
    reads: dict[str, float]  # bytes loaded per operand (every load, L2 or HBM)
    writes: float
    hbm: float  # bytes that must come from or go to HBM (each operand once; L2 flushed before)
    flops: float
    programs: int
    flops_per_s: float

    @property
    def l2(self) -> float:
        return sum(self.reads.values()) + self.writes


def _stacked_work(members: int, rows: int, inner: int, cols: int, block_r: int, block_m: int, block_n: int,
                  rank_slots: int, split16: bool, member_tiles: bool, col_group: int = 1, k_splits: int = 1) -> float:
    """Tensor-core FLOPs of one stacked launch as it runs: the base dot over padded row tiles and
    whole column tiles, one [block_m, slots * block_r] rank dot per pass in every column group of
    ``col_group`` tiles, and one [block_m, block_r] x [block_r, block_n] expand dot per member a tile
    holds (two for a 16-bit factor: the fp32 rank product is split in a high and a low half) in each
    of ``k_splits`` ranges."""
    groups, col_tiles = _column_groups(cols, block_n, col_group)
    flops = 0
    for _, _, first, last in _stacked_tiles(members, rows, block_m, member_tiles):
        span = last - first + 1
        flops += 2 * block_m * inner * (col_tiles * block_n + groups * _cdiv(span, rank_slots) * rank_slots * block_r)
        flops += k_splits * (2 if split16 else 1) * 2 * block_m * block_r * block_n * col_tiles * span
    return flops


def _stacked_launch(name: str, n: int, m: int, inner: int, cols: int, r: int, tiling: RowTiling,
                    columns: tuple[int, int], e: int, model: DeviceModel) -> Launch:
    """The stacked forward (in = x) or dx (in = dy) kernel under ``tiling`` with ``columns`` = (column
    tile, column group): loads by :func:`fused_kernel_traffic`, writes out and the fp32 rank product; with
    the tiling's split-K also every range's fp32 sums and rank blocks, written and read back (L2)."""
    block_r = block_rank(r)
    block_n, col_group = columns
    splits = tiling.k_splits
    loads = fused_kernel_traffic(n, m, inner, cols, r, tiling.block_m, block_n, tiling.rank_slots,
                                 member_tiles=tiling.member_tiles, col_group=col_group, k_splits=splits)
    partial = loads.pop("partial", 0) * 4
    outputs = n * m * cols * e + n * m * r * 4  # out and the fp32 rank product
    writes = outputs + partial
    hbm = (n * m * inner + inner * cols + n * r * (inner + cols)) * e + outputs
    reads = {key: value * e for key, value in loads.items()} | ({"partial": partial} if partial else {})
    return Launch(name, reads, writes, hbm,
                  _stacked_work(n, m, inner, cols, block_r, tiling.block_m, block_n, tiling.rank_slots, e == 2,
                                tiling.member_tiles, col_group, splits),
                  stacked_row_tiles(m, n, tiling) * _column_groups(cols, block_n, col_group)[0] * splits,
                  model.triton_flops_per_s[tiling.block_m])


def _lora_grads_launches(n: int, m: int, d: int, k: int, r: int, e: int, model: DeviceModel) -> list[Launch]:
    """The weight-gradient kernel (128-wide column tiles assumed) and, when its row reduction is
    split (fp32 atomics), the zeroing and casting of dA and dB around it."""
    block_c = 128
    programs = n * (_cdiv(d, block_c) + _cdiv(k, block_c))
    splits = grad_row_splits(m, programs, model.sms, deterministic=False)
    loads = lora_grads_traffic(n, m, d, k, r, block_c)
    reads = {"x": loads["x"] * e, "dy": loads["dy"] * e, "dyb": loads["dyb"] * 4, "xa": loads["xa"] * 4}
    grads = n * r * (d + k)
    writes = grads * (4 if splits > 1 else e)
    flops = (2 if e == 2 else 1) * 2 * n * m * block_rank(r) * (_cdiv(d, block_c) + _cdiv(k, block_c)) * block_c
    hbm = n * m * (d + k) * e + 2 * n * m * r * 4 + writes
    launches = [Launch("lora_grads", reads, writes, hbm, flops, programs * splits, model.triton_flops_per_s[64])]
    if splits > 1:  # zero the fp32 sums, then cast them (two small launches each)
        launches += [Launch("zero dA, dB", {}, grads * 4, grads * 4, 0, model.sms, 1.0)] * 2
        launches += [Launch("cast dA, dB", {"sums": grads * 4}, grads * e, grads * (4 + e), 0, model.sms, 1.0)] * 2
    return launches


def fused_launches(n: int, m: int, d: int, k: int, r: int, mode: str, columns: tuple[int, int], e: int = 2,
                   model: DeviceModel = H100) -> list[Launch]:
    """The launches of the fused Triton backend for one stacked layer call with ``columns`` = (column
    tile, column group): the forward, and for ``fwd_bwd`` the dx kernel and the weight gradients; before
    a launch that splits K, the zeroing of its tiles' arrival counts (a launch of its own)."""
    launches = []
    for name, inner, cols in (("forward", d, k), ("dx", k, d))[:2 if mode == "fwd_bwd" else 1]:
        tiling = h100_stacked_tiling(n, m, inner, cols, r)[0]
        if tiling.k_splits > 1:  # one int32 count per program of the split's grid axis 0
            programs = stacked_row_tiles(m, n, tiling) * _column_groups(cols, columns[0], columns[1])[0]
            launches.append(_small(f"{name} arrival counts", 4 * programs))
        launches.append(_stacked_launch(name, n, m, inner, cols, r, tiling, columns, e, model))
    if mode == "fwd_bwd":
        launches += _lora_grads_launches(n, m, d, k, r, e, model)
    return launches


def _gemm(name: str, rows: int, inner: int, cols: int, e: int) -> Launch:
    """A cuBLAS GEMM ``[rows, inner] @ [inner, cols]``: 128 x 256 tiles (each re-reads its operand
    strips from L2), the whole GPU busy (split-K or small tiles where the tiles are few)."""
    reads = {"in": rows * inner * e * _cdiv(cols, 256), "weight": inner * cols * e * _cdiv(rows, 128)}
    return Launch(name, reads, rows * cols * e, (rows * inner + inner * cols + rows * cols) * e,
                  2 * rows * inner * cols, 10**9, 0.0)


def _small(name: str, hbm: float, flops: float = 0) -> Launch:
    return Launch(name, {"all": hbm}, 0, hbm, flops, 10**9, 0.0)


def reference_launches(n: int, m: int, d: int, k: int, r: int, mode: str, e: int = 2) -> dict[str, list[Launch]]:
    """``F.linear`` over the same N*M rows (``limit``; with its dx GEMM for ``fwd_bwd``) and the
    composite ``torch`` backend (``F.linear``, ``x A^T`` by bmm and its fp32 cast, ``baddbmm`` of
    the update into y; backward: the dx GEMM, ``dy B``, ``baddbmm`` into dx, the dA and dB bmm's)."""
    rows = n * m
    limit = [_gemm("F.linear", rows, d, k, e)]
    composite = [_gemm("F.linear", rows, d, k, e),
                 _small("bmm x A^T", (rows * d + n * r * d + rows * r) * e, 2 * rows * d * r),
                 _small("xa to fp32", rows * r * (e + 4)),
                 _small("baddbmm y += s xa B^T", 2 * rows * k * e + rows * r * 4 + n * k * r * e, 2 * rows * r * k)]
    if mode == "fwd_bwd":
        limit.append(_gemm("dx GEMM", rows, k, d, e))
        composite += [_gemm("dx GEMM", rows, k, d, e),
                      _small("bmm dy B", (rows * k + n * k * r) * e + rows * r * 4, 2 * rows * k * r),
                      _small("baddbmm dx += s dyb A", 2 * rows * d * e + rows * r * 4 + n * r * d * e,
                             2 * rows * r * d),
                      _small("bmm dA", rows * r * 4 + rows * d * e + n * r * d * e, 2 * rows * r * d),
                      _small("bmm dB", rows * k * e + rows * r * 4 + n * k * r * e, 2 * rows * r * k)]
    return {"limit": limit, "composite": composite}


def predicted_us(launches: list[Launch], model: DeviceModel = H100) -> float:
    """Predicted device time of a sequence of launches (cuBLAS rates for the reference GEMMs)."""
    total = 0.0
    for launch in launches:
        rate = launch.flops_per_s or model.cublas_flops_per_s
        total += model.seconds(launch.hbm, launch.l2, launch.flops, rate, launch.programs)
    return total * 1e6


def main() -> None:
    """Print the headline table of ``benchmarks/NOTES.md``: per shape and mode, the fused forward's
    traffic per operand (MB, all loads), the fused launches' L2 and HBM bytes and tensor-core work,
    and the predicted H100 bf16 device times of the fused path (best column tile and group, "128 x 2":
    groups of two 128-wide tiles), ``F.linear`` and the composite, with the ratios to ``F.linear``."""
    mb = 1e-6
    print("| shape | mode | BN | forward loads MB: W0 / x / A / B | L2 MB | HBM MB | TC GFLOP | fused µs | "
          "F.linear µs | composite µs | fused ÷ F.linear | composite ÷ F.linear |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, n, m, d, k, r, modes in HEADLINE_SHAPES:
        for mode in modes:
            tiling = h100_stacked_tiling(n, m, d, k, r)[0]
            choices = kept_column_tiles(n, m, d, k, r, mode)
            best = min(choices, key=lambda columns: predicted_us(fused_launches(n, m, d, k, r, mode, columns)))
            launches = fused_launches(n, m, d, k, r, mode, best)
            refs = reference_launches(n, m, d, k, r, mode)
            fused, limit, composite = (predicted_us(x) for x in (launches, refs["limit"], refs["composite"]))
            reads = next(launch.reads for launch in launches if launch.name == "forward")
            tiles = (f"BM {tiling.block_m}{' member tiles' if tiling.member_tiles else ''}, {tiling.rank_slots} slots"
                     f"{f', K in {tiling.k_splits}' if tiling.k_splits > 1 else ''}")
            print(f"| {label} N{n} M{m} r{r} ({tiles}) | {mode} | {best[0]}{f' x {best[1]}' if best[1] > 1 else ''} | "
                  f"{reads['weight'] * mb:.1f} / {reads['in'] * mb:.1f} / {reads['shrink'] * mb:.1f} / "
                  f"{reads['expand'] * mb:.2f} | {sum(x.l2 for x in launches) * mb:.0f} | "
                  f"{sum(x.hbm for x in launches) * mb:.0f} | {sum(x.flops for x in launches) * 1e-9:.1f} | "
                  f"{fused:.1f} | {limit:.1f} | {composite:.1f} | {fused / limit:.2f} | {composite / limit:.2f} |")


if __name__ == "__main__":
    main()
