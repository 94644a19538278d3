"""Work and traffic of one LoRA-Ensemble linear layer, and the device's peaks: the two floors.

For ``N`` members, ``M`` rows each, ``d`` in, ``k`` out, rank ``r`` (``R = N*M`` rows in all)::

    forward   2Rdk (x W0^T)  + 2Rr(d + k) (x A^T, then (xA^T) B^T)
    backward  2Rdk (dy W0)   + 4Rr(d + k) (dy B; (dy B) A; dA; dB)      W0 frozen: no dW0
    limit     the base GEMM alone: 2Rdk forward, 2Rdk backward (dx only)

(:mod:`lora_ensemble.flop_counts` registers the same forward and backward counts with
``torch.utils.flop_counter``.) Bytes are the unavoidable traffic: every operand read once and every
result written once. ``xa = x A^T`` (fp32, ``4Rr`` bytes) is part of it only where a backward
follows: written by the forward of ``fwd_bwd``, read by every backward. The inference forward
(``fwd``) needs no ``xa``; the providers that write it anyway are listed by
:func:`benchmarks.providers.forward_extra_bytes`. The compute floor is FLOPs / peak FLOP/s, the
memory floor is bytes / peak bandwidth; a kernel cannot beat the larger of the two.

Peaks are measured on the device at the start of a run (:func:`device_peaks`); spec-sheet numbers
of known GPUs are kept as a labelled reference (:func:`spec_peaks`).

The fused kernels' own traffic is modelled tile by tile: :func:`fused_kernel_traffic` counts the
elements one launch of the Triton forward or dx kernel loads from each operand role (``weight``,
``in``, ``shrink``, ``expand``: W0, x or dy, A or B, B or A), the interpreter test
``tests/test_kernel_traffic.py`` checks it load by load, and :func:`traffic_budget` is the bound the
design promises any fused kernel (Triton or CUDA, for its own tile sizes): W0 once per row tile of
a plain GEMM over the stacked rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .measure import new_event_factory, synchronize, timed_calls
from .shapes import OpShape

__all__ = ["DevicePeaks", "OpCost", "device_peaks", "fused_kernel_traffic", "op_cost", "spec_peaks",
           "traffic_budget"]

MODES: tuple[str, ...] = ("fwd", "bwd", "fwd_bwd")


@dataclass(frozen=True)
class OpCost:
    """FLOPs and bytes of one call in one mode."""

    flops: int
    bytes: int


def op_cost(shape: OpShape, mode: str, elem_bytes: int, limit: bool = False) -> OpCost:
    """Cost of ``mode`` (``fwd``, ``bwd`` or ``fwd_bwd``) for ``shape``; ``limit`` counts the base
    linear alone (no LoRA factors, no ``xa``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    n, r, d, k = shape.num_members, shape.rank, shape.d, shape.k
    rows = n * shape.rows
    e = elem_bytes
    lora = 0 if limit else 1
    fwd_flops = 2 * rows * d * k + lora * 2 * rows * r * (d + k)
    bwd_flops = 2 * rows * d * k + lora * 4 * rows * r * (d + k)
    base_weights = e * d * k
    lora_weights = lora * e * n * r * (d + k)                      # all A and B
    xa = lora * 4 * rows * r                                       # x A^T in fp32
    # inference forward: read x, W0, bias, A, B; write y.
    fwd_bytes = e * rows * d + base_weights + e * k + lora_weights + e * rows * k
    # backward: read dy, W0, A, B; write dx; the LoRA grads also read x and xa and write dA, dB.
    bwd_bytes = e * rows * k + base_weights + lora_weights + e * rows * d + lora * (e * rows * d + xa) + lora_weights
    if mode == "fwd":
        return OpCost(fwd_flops, fwd_bytes)
    if mode == "bwd":
        return OpCost(bwd_flops, bwd_bytes)
    return OpCost(fwd_flops + bwd_flops, fwd_bytes + xa + bwd_bytes)  # the training forward saves xa


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fused_kernel_traffic(members: int, rows: int, inner: int, cols: int, rank: int, block_m: int, block_n: int,
                         rank_slots: int, shared_input: bool = False, sum_members: bool = False) -> dict[str, int]:
    """Elements one launch of the fused Triton kernel loads from each operand role, tile by tile as
    ``kernels/fused_lora_gemm.py`` runs (its header states the same totals): ``members`` x ``rows``
    rows of ``inner`` (K) in, ``cols`` (C) out, row tile ``block_m``, column tile ``block_n``,
    ``rank_slots`` members a rank pass (the launch policy's :class:`RowTiling`). Layouts: stacked
    (forward and dx), ``shared_input`` forward, ``sum_members`` (the shared-input dx).

    Rows and columns past the edge wrap around (a tile loads ``min(block_m, rows)`` distinct rows
    and ``min(block_n, cols)`` distinct columns); rank columns past ``rank`` and slots past a tile's
    members are masked (no traffic)."""
    k, c, r = inner, cols, rank
    col_tiles = _cdiv(c, block_n)
    strip = col_tiles * min(block_n, c)  # weight columns loaded per row tile, over its column tiles
    if shared_input or sum_members:
        row_tiles = _cdiv(rows, block_m)
        tile_rows = min(block_m, rows)
        in_reads = (2 * members if sum_members else _cdiv(members, rank_slots)) * tile_rows * k
        return {"weight": row_tiles * strip * k, "in": row_tiles * col_tiles * in_reads,
                "shrink": row_tiles * col_tiles * members * r * k, "expand": row_tiles * members * r * c}
    stacked = members * rows
    traffic = {"weight": 0, "in": 0, "shrink": 0, "expand": 0}
    for start in range(0, stacked, block_m):
        end = min(start + block_m, stacked)
        first, last = start // rows, (end - 1) // rows
        span = last - first + 1
        later_rows = max(0, end - max(start, (first + rank_slots) * rows))  # rows of further passes
        traffic["weight"] += strip * k
        traffic["in"] += col_tiles * (min(block_m, stacked) + later_rows) * k
        traffic["shrink"] += col_tiles * span * r * k
        traffic["expand"] += span * r * c
    return traffic


def traffic_budget(members: int, rows: int, inner: int, cols: int, rank: int, block_m: int, block_n: int,
                   shared_input: bool = False, sum_members: bool = False) -> dict[str, int]:
    """The most elements a fused kernel with ``block_m`` x ``block_n`` output tiles may load from
    each operand role per launch (the design's promise; :func:`fused_kernel_traffic` is what the
    Triton kernel loads):

    - ``weight`` (W0): once per row tile of a plain GEMM over the stacked rows with the same
      ``block_m`` (``T = cdiv(N*M, block_m)`` tiles; ``cdiv(M, block_m)`` with a shared input),
      in whole column tiles: 1x W0 at decode (16 x 1 rows, 8 x 2 rows, one 16-row tile);
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
    return {"weight": row_tiles * strip, "in": 2 * row_tiles * col_tiles * min(block_m, members * rows) * k,
            "shrink": col_tiles * members_held * r * k, "expand": members_held * r * c}


@dataclass(frozen=True)
class DevicePeaks:
    """Peak dense FLOP/s for a dtype and peak memory bandwidth, with where the numbers come from."""

    flops_per_s: float
    bytes_per_s: float
    source: str


# Spec-sheet dense peaks (no sparsity), FLOP/s by dtype, and HBM bandwidth in bytes/s: a reference
# only. fp32 is the CUDA-core rate: PyTorch's matmuls do not use TF32 unless allowed.
_GPU_SPECS: tuple[tuple[str, dict[torch.dtype, float], float], ...] = (
    ("H200", {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 66.9e12}, 4.8e12),
    ("H100 PCIe", {torch.bfloat16: 756.0e12, torch.float16: 756.0e12, torch.float32: 51.2e12}, 2.0e12),
    ("H100", {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 66.9e12}, 3.35e12),
    ("A100", {torch.bfloat16: 312.0e12, torch.float16: 312.0e12, torch.float32: 19.5e12}, 2.0e12),
)
_TF32_PEAK_FRACTION = 0.5  # TF32 tensor-core rate is half the 16-bit rate on Ampere and Hopper


def spec_peaks(device: torch.device, dtype: torch.dtype) -> DevicePeaks | None:
    """The spec-sheet peaks of a known GPU (a reference beside the measured ones), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops, bandwidth in _GPU_SPECS:
        if key in name and dtype in flops:
            peak = flops[dtype]
            if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
                peak = _TF32_PEAK_FRACTION * flops[torch.bfloat16]
            return DevicePeaks(peak, bandwidth, f"spec sheet ({key})")
    return None


def _best_seconds(fn, device: torch.device, warmup_s: float, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``fn`` (CUDA events on a GPU), after calling it
    for ``warmup_s`` (clocks ramp up) and at least once."""
    new_event = new_event_factory(device)
    (once,) = timed_calls(fn, 1, lambda: None, new_event, synchronize)
    for _ in range(min(1000, int(warmup_s / max(once, 1e-7)))):
        fn()
    return min(timed_calls(fn, repeats, lambda: None, new_event, synchronize))


@functools.cache
def device_peaks(device: torch.device, dtype: torch.dtype) -> DevicePeaks:
    """Peaks measured on ``device``: the best of a few large ``dtype`` GEMMs (FLOP/s) and of a large
    device-to-device copy (bytes read + written per second). Cached: the first call (the start of a
    benchmark run, ``conftest.py``) measures; on a GPU it also warms the clocks up.

    fp32 GEMMs run as PyTorch's fp32 matmul setting says (``allow_tf32``; off by default: CUDA-core
    FMAs). The fused ``triton`` backend's fp32 dots run on tensor cores instead (3xTF32, see
    ``kernels/configs.py::dot_precision``), so in fp32 it can run under this compute floor.
    """
    cuda = device.type == "cuda"
    size, copy_mib = (8192, 1024) if cuda else (1024, 64)
    lhs = torch.randn(size, size, device=device).to(dtype)
    rhs = torch.randn(size, size, device=device).to(dtype)
    gemm_s = _best_seconds(lambda: lhs @ rhs, device, warmup_s=0.5 if cuda else 0.0, repeats=10 if cuda else 5)
    src = torch.randn(copy_mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    copy_s = _best_seconds(lambda: dst.copy_(src), device, warmup_s=0.1 if cuda else 0.0, repeats=10 if cuda else 5)
    precision = ""
    if dtype == torch.float32 and cuda:
        precision = f", fp32 matmul with allow_tf32={torch.backends.cuda.matmul.allow_tf32}"
    return DevicePeaks(2 * size**3 / gemm_s, 2 * src.numel() * 4 / copy_s,
                       f"measured at the start of the run: best {size}^3 {str(dtype).removeprefix('torch.')} "
                       f"GEMM{precision}, {copy_mib} MiB copy")
