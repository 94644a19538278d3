"""Op-level benchmarks: one LoRA-Ensemble linear layer, forward, backward and forward+backward.

Every provider of :mod:`benchmarks.providers` runs on the same inputs: ``tests.utils.make_inputs``
(scaling 1 as in the paper's code) drawn after ``torch.manual_seed(0)``, so each shape's values are
identical for every provider. The providers of one shape and mode form one pytest-benchmark group
(``"<mode> | <shape>"``). Each row's ``extra_info`` carries the provider, the op's FLOPs and bytes,
the two floors, the host and device times (:mod:`benchmarks.measure`), the achieved TFLOP/s and
GB/s (from the device time), for ``fwd`` the bytes a provider writes beyond what inference needs,
and for ``fwd_bwd`` the training step's peak memory; ``conftest.py`` adds the ratios to ``limit``,
``vmap`` and ``vmap_paper`` when the JSON is written.
"""

from __future__ import annotations

import pytest
import torch

from tests.utils import make_inputs

from .cost_model import MODES, device_peaks, op_cost
from .measure import memory_peak, synchronized_timer, time_step
from .providers import OP_PROVIDERS, build_op_run, forward_extra_bytes, make_step, provider_unavailable_reason
from .shapes import OpShape, bench_device, bench_dtype, selected_op_shapes

pytestmark = pytest.mark.benchmark(timer=synchronized_timer, disable_gc=True)

# Autograd runs a backward on the streams of its forward; bwd's forward is recorded before any
# capture, on the default stream, so a CUDA graph captured on a side stream cannot hold its backward.
BWD_NO_GRAPH = "bwd replays the backward of a forward recorded outside the capture stream"


def record_rates(benchmark, flops: int, nbytes: int) -> None:
    """Achieved TFLOP/s and GB/s from the device time (nothing when benchmarks are disabled)."""
    seconds = benchmark.extra_info.get("device_s")
    if seconds:
        benchmark.extra_info.update(tflops=flops / seconds / 1e12, gbps=nbytes / seconds / 1e9)


@pytest.mark.parametrize("provider", OP_PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", selected_op_shapes(), ids=lambda s: str(s).replace(" ", "-"))
def test_op(benchmark, shape: OpShape, mode: str, provider: str) -> None:
    device, dtype = bench_device(), bench_dtype()
    benchmark.group = f"{mode} | {shape}"  # before any skip: the report lists a skipped row as MISSING
    benchmark.extra_info.update(provider=provider, mode=mode, shape=str(shape), dtype=str(dtype).removeprefix("torch."))
    reason = provider_unavailable_reason(provider, device, dtype, shape)
    if reason is not None:
        pytest.skip(reason)
    torch.manual_seed(0)
    inp = make_inputs(shape.num_members, shape.rows, shape.d, shape.k, shape.rank, dtype=dtype, device=device,
                      scaling=1.0)
    run = build_op_run(provider, inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling,
                       seq_len=shape.sequence_length)
    step = make_step(run, mode)
    cost = op_cost(shape, mode, torch.finfo(dtype).bits // 8, limit=provider == "limit")
    peaks = device_peaks(device, dtype)
    benchmark.extra_info.update(
        num_members=shape.num_members, rows=shape.rows, d=shape.d, k=shape.k, rank=shape.rank,
        flops=cost.flops, bytes=cost.bytes,
        floor_compute_s=cost.flops / peaks.flops_per_s, floor_memory_s=cost.bytes / peaks.bytes_per_s,
    )
    if mode == "fwd":
        benchmark.extra_info["extra_bytes"] = forward_extra_bytes(provider, shape.num_members, shape.rows,
                                                                  shape.rank, dtype)
    time_step(benchmark, step, device, no_graph=BWD_NO_GRAPH if mode == "bwd" else None)
    record_rates(benchmark, cost.flops, cost.bytes)
    if mode == "fwd_bwd":
        benchmark.extra_info.update(memory_peak(step, device).extra_info())
