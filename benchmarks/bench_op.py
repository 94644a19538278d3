"""Op-level benchmarks: one LoRA-Ensemble linear layer, forward, backward and forward+backward.

Every provider of :mod:`benchmarks.providers` runs on the same random inputs (``tests.utils.make_inputs``,
scaling 1 as in the paper's code); the providers of one shape and mode form one pytest-benchmark group
(``"<mode> | <shape>"``). Each row's ``extra_info`` carries the provider, the op's FLOPs and bytes,
the two floors, the achieved TFLOP/s and GB/s, and for ``fwd_bwd`` the training step's peak memory;
``conftest.py`` adds the ratios to ``limit`` and ``vmap`` when the JSON is written.
"""

from __future__ import annotations

import pytest
import torch

from tests.utils import make_inputs

from .cost_model import MODES, device_peaks, op_cost
from .measure import budget_for, peak_memory_bytes, synchronized_timer, time_step
from .providers import OP_PROVIDERS, build_op_run, make_step, provider_unavailable_reason
from .shapes import OpShape, bench_device, bench_dtype, selected_op_shapes

pytestmark = pytest.mark.benchmark(timer=synchronized_timer, disable_gc=True)


def record_rates(benchmark, flops: int, nbytes: int) -> None:
    """Achieved TFLOP/s and GB/s from the median time (nothing when benchmarks are disabled)."""
    if benchmark.stats is None:
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(median_s=median, tflops=flops / median / 1e12, gbps=nbytes / median / 1e9)


@pytest.mark.parametrize("provider", OP_PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", selected_op_shapes(), ids=lambda s: str(s).replace(" ", "-"))
def test_op(benchmark, shape: OpShape, mode: str, provider: str) -> None:
    device, dtype = bench_device(), bench_dtype()
    reason = provider_unavailable_reason(provider, device)
    if reason is not None:
        pytest.skip(reason)
    inp = make_inputs(shape.num_members, shape.rows, shape.d, shape.k, shape.rank, dtype=dtype, device=device,
                      scaling=1.0)
    run = build_op_run(provider, inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling)
    step = make_step(run, mode)
    cost = op_cost(shape, mode, torch.finfo(dtype).bits // 8, limit=provider == "limit")
    peaks = device_peaks(device, dtype)
    benchmark.group = f"{mode} | {shape}"
    benchmark.extra_info.update(
        provider=provider, mode=mode, shape=str(shape), dtype=str(dtype).removeprefix("torch."),
        num_members=shape.num_members, rows=shape.rows, d=shape.d, k=shape.k, rank=shape.rank,
        flops=cost.flops, bytes=cost.bytes,
        floor_compute_s=cost.flops / peaks.flops_per_s, floor_memory_s=cost.bytes / peaks.bytes_per_s,
    )
    time_step(benchmark, step, budget_for(device))
    record_rates(benchmark, cost.flops, cost.bytes)
    if mode == "fwd_bwd":
        benchmark.extra_info["peak_memory_bytes"] = peak_memory_bytes(step, device)
