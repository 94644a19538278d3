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

What the fused kernels themselves read, tile by tile, is :mod:`benchmarks.kernel_traffic`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .measure import new_event_factory, synchronize, timed_calls
from .shapes import OpShape

__all__ = ["DevicePeaks", "OpCost", "device_peaks", "op_cost", "spec_peaks"]

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
