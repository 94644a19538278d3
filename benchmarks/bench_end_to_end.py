"""End-to-end benchmarks: a ViT made into a 16-member LoRA-Ensemble, inference at batch 1 and one
training step at the training batch, for every provider of :mod:`benchmarks.e2e_models` (fused
backends, the fused ensemble as CUDA graphs, ``vmap``, an explicit loop over 16 models, and
``limit``: one plain model at 16x the batch).

Images and labels are random (seed 0, the same for every provider); ``limit`` gets the ``N*B``
images an ensemble computes on. Groups are ``"<mode> | <model>"``; host and device times as in
:mod:`benchmarks.measure` (the device time of a CUDA-graph replay of the whole step where it can be
captured); ``conftest.py`` adds the ratios to ``limit`` and ``vmap``.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.utils

from .e2e_models import E2E_PROVIDERS, build_e2e_run, e2e_unavailable_reason, make_e2e_step
from .measure import memory_peak, synchronized_timer, time_step
from .shapes import bench_device, bench_dtype, selected_e2e_shape

pytestmark = pytest.mark.benchmark(timer=synchronized_timer, disable_gc=True)

E2E_MODES: tuple[str, ...] = ("e2e_infer", "e2e_train")


@pytest.mark.parametrize("provider", E2E_PROVIDERS)
@pytest.mark.parametrize("mode", E2E_MODES)
def test_end_to_end(benchmark, mode: str, provider: str) -> None:
    device, dtype = bench_device(), bench_dtype()
    shape = selected_e2e_shape()
    batch = shape.infer_batch if mode == "e2e_infer" else shape.train_batch
    label = f"{shape} B{batch}"
    benchmark.group = f"{mode} | {label}"  # before any skip: the report lists a skipped row as MISSING
    benchmark.extra_info.update(provider=provider, mode=mode, shape=label, dtype=str(dtype).removeprefix("torch."))
    reason = e2e_unavailable_reason(provider, device)
    if reason is not None:
        pytest.skip(reason)
    torch.manual_seed(0)
    images = torch.randn(batch, 3, shape.image_size, shape.image_size, device=device, dtype=dtype)
    labels = torch.randint(0, shape.num_classes, (batch,), device=device).repeat(shape.num_members)
    if provider == "limit":
        images = images.repeat(shape.num_members, 1, 1, 1)
    run = build_e2e_run(provider, shape, device, dtype)
    step = make_e2e_step(run, mode, images, labels)
    benchmark.extra_info.update(num_members=shape.num_members, rank=shape.rank, batch=batch, images=images.shape[0],
                                backend=run.backend)
    if not run.graphed:
        time_step(benchmark, step, device)
        if mode == "e2e_train":
            benchmark.extra_info.update(memory_peak(step, device).extra_info())
        return
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    try:
        time_step(benchmark, step, device, no_graph="replays CUDA graphs already (reduce-overhead)")
        # The graphs' memory pools are allocated once, at recording: the allocator's peak during a
        # replay says nothing about what the step needs, so no peak memory is recorded.
        benchmark.extra_info["cudagraph_skips"] = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] - skips
    finally:
        torch._dynamo.reset()  # frees the CUDA graph trees' memory pools before the next row
