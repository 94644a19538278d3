# What the cost models (kernels/config_model.py, lora_ensemble/auto_costs.py) need to know about a
# GPU: SM count and clock, the dense throughput of one SM per clock for each kind of dot (16-bit
# tensor cores, TF32 tensor cores, fp32 CUDA cores), DRAM and L2 bandwidth, and the per-SM limits
# that bound occupancy (shared memory, registers, threads). Everything but the per-clock rates and
# the L2 bandwidth comes from the device's own properties; the rates are a small table per
# architecture (the spec sheets' dense peaks divided by SMs x boost clock).
"""GPU facts for the cost models: derived from a device's properties and a per-architecture table."""

from __future__ import annotations

import functools
from dataclasses import dataclass

__all__ = ["ArchRates", "GpuSpec", "H100_SXM", "arch_rates", "gpu_spec", "gpu_spec_from_properties"]


@dataclass(frozen=True)
class ArchRates:
    """Dense throughput of one SM per clock on an architecture (FLOP, multiply and add counted)."""

    tensor16: int  # fp16 / bf16 tensor-core dots with fp32 accumulation
    tf32: int  # TF32 tensor-core dots
    fp32: int  # fp32 FMA on CUDA cores
    l2_bytes_per_clock: int  # L2 read bandwidth per SM per clock (an estimate: no spec sheet gives it)
    source: str


# Spec-sheet dense peaks / (SMs x boost clock), rounded to the power of two they come from:
#   sm_80 A100 SXM: 312 TFLOP/s bf16 = 108 SMs x 1.41 GHz x 2048; fp32 19.5 TFLOP/s -> 128.
#   sm_86 A10: 125 TFLOP/s fp16 (fp32 accumulate) = 72 x 1.695 GHz x 1024; fp32 31.2 -> 256.
#   sm_89 L40S / L4: 362 / 121 TFLOP/s = 142 x 2.52 GHz / 58 x 2.04 GHz x 1024; fp32 -> 256.
#   sm_90 H100 SXM: 989 TFLOP/s bf16 = 132 x 1.83 GHz x 4096; fp32 66.9 TFLOP/s at 1.98 GHz -> 256.
#   sm_100 B200: 2.25 PFLOP/s bf16 = 148 x ~1.86 GHz x 8192.
# L2: ~32 B per SM per clock (H100 PCIe measured ~5.5 TB/s by microbenchmarks: 114 SMs x 1.755 GHz x 27).
_ARCH_RATES: dict[int, ArchRates] = {
    80: ArchRates(2048, 1024, 128, 32, "A100 spec sheet"),
    86: ArchRates(1024, 512, 256, 32, "A10 spec sheet"),
    89: ArchRates(1024, 512, 256, 32, "L40S / L4 spec sheets"),
    90: ArchRates(4096, 2048, 256, 32, "H100 SXM spec sheet"),
    100: ArchRates(8192, 4096, 256, 32, "B200 spec sheet"),
}
# A smem read port of 128 bytes per clock per SM on every architecture above.
SHARED_MEMORY_BYTES_PER_CLOCK = 128


def arch_rates(capability: int) -> ArchRates:
    """The rates of compute capability ``capability`` (``10 * major + minor``): its own entry, else the
    nearest older architecture's (sm_120 counts as sm_89, the consumer line it follows; anything older
    than sm_80 as sm_80)."""
    if capability in _ARCH_RATES:
        return _ARCH_RATES[capability]
    if capability >= 120:
        return _ARCH_RATES[89]
    older = [c for c in _ARCH_RATES if c <= capability]
    return _ARCH_RATES[max(older)] if older else _ARCH_RATES[80]


@dataclass(frozen=True)
class GpuSpec:
    """One GPU as the cost models see it. Rates are per second for the whole device."""

    name: str
    capability: int
    sm_count: int
    clock_hz: float
    tensor16_flops: float
    tf32_flops: float
    fp32_flops: float
    dram_bytes_per_s: float
    l2_bytes_per_s: float
    l2_bytes: int
    shared_memory_per_sm: int
    shared_memory_per_program: int
    registers_per_sm: int
    max_threads_per_sm: int

    def dot_flops(self, precision: str) -> float:
        """Dense FLOP/s of a dot in ``precision``: ``"16bit"``, ``"tf32"``, ``"tf32x3"`` (three TF32
        passes) or ``"fp32"`` (CUDA-core FMAs)."""
        return {"16bit": self.tensor16_flops, "tf32": self.tf32_flops, "tf32x3": self.tf32_flops / 3,
                "fp32": self.fp32_flops}[precision]


def gpu_spec_from_properties(name: str, major: int, minor: int, sm_count: int, clock_khz: int,
                             memory_clock_khz: int, memory_bus_width: int, l2_bytes: int,
                             shared_memory_per_sm: int, shared_memory_per_program: int, registers_per_sm: int,
                             max_threads_per_sm: int) -> GpuSpec:
    """A :class:`GpuSpec` from the fields of ``torch.cuda.get_device_properties`` (clocks in kHz as
    CUDA reports them; DRAM bandwidth = 2 transfers per memory clock x bus width)."""
    capability = 10 * major + minor
    rates = arch_rates(capability)
    clock = clock_khz * 1e3
    per_sm = sm_count * clock
    return GpuSpec(
        name=name, capability=capability, sm_count=sm_count, clock_hz=clock,
        tensor16_flops=per_sm * rates.tensor16, tf32_flops=per_sm * rates.tf32, fp32_flops=per_sm * rates.fp32,
        dram_bytes_per_s=2 * memory_clock_khz * 1e3 * memory_bus_width / 8,
        l2_bytes_per_s=per_sm * rates.l2_bytes_per_clock, l2_bytes=l2_bytes,
        shared_memory_per_sm=shared_memory_per_sm, shared_memory_per_program=shared_memory_per_program,
        registers_per_sm=registers_per_sm, max_threads_per_sm=max_threads_per_sm,
    )


# An H100 SXM as torch reports it (1980 MHz, HBM3 at 2619 MHz on 5120 bits: 3.35 TB/s): the GPU the
# models assume where there is none (the Triton interpreter on a CPU, and tests).
H100_SXM = gpu_spec_from_properties("NVIDIA H100 80GB HBM3", 9, 0, 132, 1980000, 2619000, 5120, 50 * 2**20,
                                    233472, 232448, 65536, 2048)


@functools.cache
def _cuda_spec(index: int) -> GpuSpec:
    import torch

    p = torch.cuda.get_device_properties(index)
    return gpu_spec_from_properties(p.name, p.major, p.minor, p.multi_processor_count, p.clock_rate,
                                    p.memory_clock_rate, p.memory_bus_width, p.L2_cache_size,
                                    p.shared_memory_per_multiprocessor,
                                    getattr(p, "shared_memory_per_block_optin", p.shared_memory_per_block),
                                    p.regs_per_multiprocessor, p.max_threads_per_multi_processor)


def gpu_spec(device) -> GpuSpec:
    """The :class:`GpuSpec` of a CUDA ``device`` (cached per device); :data:`H100_SXM` for any other."""
    if device.type != "cuda":
        return H100_SXM
    import torch

    return _cuda_spec(device.index if device.index is not None else torch.cuda.current_device())
