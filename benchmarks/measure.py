"""How the benchmarks measure: a synchronizing timer, warm-up before timing, and peak memory.

The timer calls ``torch.cuda.synchronize()`` before reading ``time.perf_counter()``, and
pytest-benchmark reads it only around a round of ``iterations`` calls, so a round's time is the
device time of those calls without a synchronization between them. Warm-up calls (which trigger
torch.compile, Triton autotuning and cuBLAS heuristics) run before the round length is chosen and
are never timed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["TimingBudget", "budget_for", "peak_memory_bytes", "synchronize", "synchronized_timer", "time_step"]


def synchronize() -> None:
    """Wait for every queued CUDA kernel (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synchronized_timer() -> float:
    """``time.perf_counter()`` after the GPU has finished its queued work."""
    synchronize()
    return time.perf_counter()


@dataclass(frozen=True)
class TimingBudget:
    """Warm-up calls, the target length of one timed round, and the rounds' bounds and total time."""

    warmup_calls: int
    round_s: float
    min_rounds: int
    max_rounds: int
    total_s: float


GPU_BUDGET = TimingBudget(warmup_calls=5, round_s=0.02, min_rounds=10, max_rounds=30, total_s=0.5)
CPU_BUDGET = TimingBudget(warmup_calls=1, round_s=0.01, min_rounds=5, max_rounds=25, total_s=0.5)


def budget_for(device: torch.device) -> TimingBudget:
    """The GPU budget on CUDA, the (smaller) CPU budget elsewhere."""
    return GPU_BUDGET if device.type == "cuda" else CPU_BUDGET


def time_step(benchmark, step: Callable[[], object], budget: TimingBudget) -> None:
    """Warm ``step`` up untimed, size rounds to ``budget.round_s``, then time it with
    ``benchmark.pedantic`` (which reports per-call times). The machine's 1-minute load average
    after the run goes into ``extra_info["load_1m"]``: other processes on the cores show there."""
    for _ in range(budget.warmup_calls):
        step()
    start = synchronized_timer()
    step()
    once = max(synchronized_timer() - start, 1e-7)
    iterations = max(1, math.ceil(budget.round_s / once))
    rounds = min(budget.max_rounds, max(budget.min_rounds, int(budget.total_s / (once * iterations))))
    benchmark.pedantic(step, rounds=rounds, iterations=iterations, warmup_rounds=1)
    benchmark.extra_info["load_1m"] = os.getloadavg()[0]


def peak_memory_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while ``step`` runs once, tensors alive before it included.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the peak of torch.profiler's
    memory timeline (every tensor the step allocates or touches, by category, summed).
    """
    if device.type == "cuda":
        synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize()
        return int(torch.cuda.max_memory_allocated(device))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export_memory_timeline is deprecated in favour of a CUDA-only tool
        path = os.path.join(tmp, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)
    return int(max((sum(s) for s in sizes), default=0))
