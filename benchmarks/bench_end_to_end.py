"""End-to-end benchmarks: a ViT made into a 16-member LoRA-Ensemble, inference at batch 1 and one
training step at the training batch, for every provider of :mod:`benchmarks.e2e_models` (fused
backends, ``vmap``, an explicit loop over 16 models, and ``limit``: one plain model at 16x the batch).

Images and labels are random; ``limit`` gets the ``N*B`` images an ensemble computes on. Groups are
``"<mode> | <model>"``; ``conftest.py`` adds the ratios to ``limit`` and ``vmap``.
"""

from __future__ import annotations

import pytest
import torch

from .e2e_models import E2E_PROVIDERS, build_e2e_run, e2e_unavailable_reason, make_e2e_step
from .measure import budget_for, peak_memory_bytes, synchronized_timer, time_step
from .shapes import bench_device, bench_dtype, selected_e2e_shape

pytestmark = pytest.mark.benchmark(timer=synchronized_timer, disable_gc=True)

E2E_MODES: tuple[str, ...] = ("e2e_infer", "e2e_train")


@pytest.mark.parametrize("provider", E2E_PROVIDERS)
@pytest.mark.parametrize("mode", E2E_MODES)
def test_end_to_end(benchmark, mode: str, provider: str) -> None:
    device, dtype = bench_device(), bench_dtype()
    reason = e2e_unavailable_reason(provider, device)
    if reason is not None:
        pytest.skip(reason)
    shape = selected_e2e_shape()
    batch = shape.infer_batch if mode == "e2e_infer" else shape.train_batch
    images = torch.randn(batch, 3, shape.image_size, shape.image_size, device=device, dtype=dtype)
    labels = torch.randint(0, shape.num_classes, (batch,), device=device).repeat(shape.num_members)
    if provider == "limit":
        images = images.repeat(shape.num_members, 1, 1, 1)
    run = build_e2e_run(provider, shape, device, dtype)
    step = make_e2e_step(run, mode, images, labels)
    label = f"{shape} B{batch}"
    benchmark.group = f"{mode} | {label}"
    benchmark.extra_info.update(provider=provider, mode=mode, shape=label, dtype=str(dtype).removeprefix("torch."),
                                num_members=shape.num_members, rank=shape.rank, batch=batch,
                                images=images.shape[0])
    time_step(benchmark, step, budget_for(device))
    if mode == "e2e_train":
        benchmark.extra_info["peak_memory_bytes"] = peak_memory_bytes(step, device)
