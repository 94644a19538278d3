"""Work and traffic of one LoRA-Ensemble linear layer, and the device's peaks: the two floors.

For ``N`` members, ``M`` rows each, ``d`` in, ``k`` out, rank ``r`` (``R = N*M`` rows in all)::

    forward   2Rdk (x W0^T)  + 2Rr(d + k) (x A^T, then (xA^T) B^T)
    backward  2Rdk (dy W0)   + 4Rr(d + k) (dy B; (dy B) A; dA; dB)      W0 frozen: no dW0
    limit     the base GEMM alone: 2Rdk forward, 2Rdk backward (dx only)

Bytes are the unavoidable traffic: every operand read once and every result written once
(``xa = x A^T`` is saved for backward in fp32). The compute floor is FLOPs / peak FLOP/s, the memory
floor is bytes / peak bandwidth; a kernel cannot beat the larger of the two.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from .shapes import OpShape

__all__ = ["DevicePeaks", "OpCost", "device_name", "device_peaks", "op_cost"]

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
    xa = lora * 4 * rows * r                                       # x A^T, saved in fp32
    # forward: read x, W0, bias, A, B; write y (and xa).
    fwd_bytes = e * rows * d + base_weights + e * k + lora_weights + e * rows * k + xa
    # backward: read dy, W0, A, B; write dx; the LoRA grads also read x and xa and write dA, dB.
    bwd_bytes = e * rows * k + base_weights + lora_weights + e * rows * d + lora * (e * rows * d + xa) + lora_weights
    if mode == "fwd":
        return OpCost(fwd_flops, fwd_bytes)
    if mode == "bwd":
        return OpCost(bwd_flops, bwd_bytes)
    return OpCost(fwd_flops + bwd_flops, fwd_bytes + bwd_bytes)


@dataclass(frozen=True)
class DevicePeaks:
    """Peak dense FLOP/s for a dtype and peak memory bandwidth, with where the numbers come from."""

    flops_per_s: float
    bytes_per_s: float
    source: str


# Spec-sheet dense peaks (no sparsity), FLOP/s by dtype, and HBM bandwidth in bytes/s. fp32 is the
# CUDA-core rate: PyTorch's matmuls do not use TF32 unless allowed.
_GPU_SPECS: tuple[tuple[str, dict[torch.dtype, float], float], ...] = (
    ("H200", {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 66.9e12}, 4.8e12),
    ("H100 PCIe", {torch.bfloat16: 756.0e12, torch.float16: 756.0e12, torch.float32: 51.2e12}, 2.0e12),
    ("H100", {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 66.9e12}, 3.35e12),
    ("A100", {torch.bfloat16: 312.0e12, torch.float16: 312.0e12, torch.float32: 19.5e12}, 2.0e12),
)
_TF32_PEAK_FRACTION = 0.5  # TF32 tensor-core rate is half the 16-bit rate on Ampere and Hopper


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model with its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{model} ({threads} thread{'s' if threads != 1 else ''})"


@functools.cache
def device_peaks(device: torch.device, dtype: torch.dtype) -> DevicePeaks:
    """Spec-sheet peaks for a known GPU; otherwise measured here: the best of a few large GEMMs
    in ``dtype`` and a large copy (read + write)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops, bandwidth in _GPU_SPECS:
            if key in name and dtype in flops:
                peak = flops[dtype]
                if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
                    peak = _TF32_PEAK_FRACTION * flops[torch.bfloat16]
                return DevicePeaks(peak, bandwidth, f"spec sheet ({key})")
    return _measured_peaks(device, dtype)


def _best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _measured_peaks(device: torch.device, dtype: torch.dtype) -> DevicePeaks:
    size = 1024 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    gemm_s = _best_time(lambda: a @ b, repeats=5)
    src = torch.randn(64 * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    copy_s = _best_time(lambda: dst.copy_(src), repeats=5)
    return DevicePeaks(2 * size**3 / gemm_s, 2 * src.numel() * 4 / copy_s,
                       f"measured here ({size}^3 GEMM, 64 MiB copy)")
