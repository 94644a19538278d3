"""How the benchmarks measure: host time, device time, and peak memory.

Every row records two times per call:

* **host time** (pytest-benchmark's stats): ``time.perf_counter()`` after ``torch.cuda.synchronize()``,
  read around a round of ``iterations`` back-to-back calls, so a round's time covers the calls'
  Python, dispatch and launch cost as well as their kernels. Inputs stay in cache (L2 on a GPU)
  from one call to the next. This is what a caller waits for.
* **device time** (``extra_info["device_s"]``, on CUDA): the GPU's own time for one call, with L2
  flushed before it. Each call is bracketed by CUDA events recorded *after* the flush: a write of
  :func:`flush_bytes` (twice the L2 size, at least 256 MiB) that evicts every input, so each call
  reads its operands from HBM as a layer inside a model would (a model reads each layer's weights
  once per step). The flush also keeps the GPU busy (~0.1 ms) while the host queues the call, so
  the events see the kernels back to back unless the call's host cost is longer than that.
  When the step can be captured in a CUDA graph, its replays are timed the same way and give the
  device time with no host gaps at all (``device_method = "cuda_graph"``); when capture fails the
  reason is recorded (``graph_error``) and the event time stands (``"cuda_events"``). On a CPU
  there is no separate device: the device time is the host time (``"wall_clock"``).

Warm-up calls (which trigger torch.compile, Triton autotuning and cuBLAS heuristics) run before
anything is timed. Peak memory is measured after ``gc.collect()`` and ``torch.cuda.empty_cache()``,
see :func:`memory_peak`.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = [
    "DeviceTime",
    "MemoryPeak",
    "TimingBudget",
    "budget_for",
    "device_calls",
    "device_time",
    "flush_bytes",
    "l2_cache_bytes",
    "memory_peak",
    "new_event_factory",
    "synchronize",
    "synchronized_timer",
    "time_step",
    "timed_calls",
    "WallEvent",
]

L2_FALLBACK_BYTES = 128 * 2**20  # when torch does not report the L2 size: above every current GPU's L2
MIN_FLUSH_BYTES = 256 * 2**20    # ~0.1 ms of writes on an H100: time for the host to queue the next call
DEVICE_ROUND_S = 0.1             # target time of each device-time measurement (events, graph replays)
MIN_DEVICE_CALLS, MAX_DEVICE_CALLS = 10, 200


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
    """Warm-up (calls, then more calls until ``warmup_s`` has passed), the target length of one timed
    round, and the rounds' bounds and total time."""

    warmup_calls: int
    warmup_s: float
    round_s: float
    min_rounds: int
    max_rounds: int
    total_s: float


# On a GPU, warm-up also runs for 0.1 s so that clocks have ramped up before the first timed round.
GPU_BUDGET = TimingBudget(warmup_calls=5, warmup_s=0.1, round_s=0.02, min_rounds=10, max_rounds=30, total_s=0.5)
CPU_BUDGET = TimingBudget(warmup_calls=1, warmup_s=0.0, round_s=0.01, min_rounds=5, max_rounds=25, total_s=0.5)


def budget_for(device: torch.device) -> TimingBudget:
    """The GPU budget on CUDA, the (smaller) CPU budget elsewhere."""
    return GPU_BUDGET if device.type == "cuda" else CPU_BUDGET


def l2_cache_bytes(device: torch.device) -> int | None:
    """The GPU's L2 size (``L2_cache_size`` of its properties), or None (CPU, or not reported)."""
    if device.type != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None) or None


def flush_bytes(l2_bytes: int | None) -> int:
    """Bytes written between timed calls: twice the L2 (:data:`L2_FALLBACK_BYTES` when unknown), at
    least :data:`MIN_FLUSH_BYTES`."""
    return max(2 * (l2_bytes or L2_FALLBACK_BYTES), MIN_FLUSH_BYTES)


def device_calls(once_s: float) -> int:
    """How many calls one device-time measurement times: :data:`DEVICE_ROUND_S` worth of calls of
    ``once_s`` each, within [:data:`MIN_DEVICE_CALLS`, :data:`MAX_DEVICE_CALLS`]."""
    return min(MAX_DEVICE_CALLS, max(MIN_DEVICE_CALLS, math.ceil(DEVICE_ROUND_S / max(once_s, 1e-7))))


class _Event(Protocol):
    """What :func:`timed_calls` needs of ``torch.cuda.Event``."""

    def record(self) -> None: ...

    def elapsed_time(self, end: _Event) -> float: ...


def timed_calls(call: Callable[[], object], calls: int, flush: Callable[[], object],
                new_event: Callable[[], _Event], wait: Callable[[], None]) -> list[float]:
    """Seconds per call of ``calls`` calls: ``flush()``, then a start event, ``call()``, an end event;
    the flush is outside every measured interval. ``wait()`` runs once, before the events are read
    (``elapsed_time`` is in milliseconds, as CUDA events report it)."""
    pairs = []
    for _ in range(calls):
        flush()
        start, end = new_event(), new_event()
        start.record()
        call()
        end.record()
        pairs.append((start, end))
    wait()
    return [start.elapsed_time(end) / 1e3 for start, end in pairs]


class WallEvent:
    """A host-clock stand-in for ``torch.cuda.Event`` (CPU devices): ``record`` reads ``perf_counter``."""

    def __init__(self) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: WallEvent) -> float:
        return (end.t - self.t) * 1e3


def _cuda_event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)


def new_event_factory(device: torch.device) -> Callable[[], _Event]:
    """Timing CUDA events on a GPU, :class:`WallEvent` elsewhere."""
    return _cuda_event if device.type == "cuda" else WallEvent


def _graph_replay_times(step: Callable[[], object], calls: int, flush: Callable[[], object]) -> list[float]:
    """Capture one ``step`` in a CUDA graph (after 3 warm-up calls on a side stream, as the CUDA
    graphs notes of PyTorch ask) and time ``calls`` replays; the graph is freed on return."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = timed_calls(graph.replay, calls, flush, _cuda_event, torch.cuda.synchronize)
    del graph
    return times


@dataclass(frozen=True)
class DeviceTime:
    """The device time of one call and how it was measured (see the module docstring).

    ``seconds`` is ``graph_s`` when a graph was captured, else ``events_s``, else (CPU) the host
    median. ``flush_bytes`` is the L2 flush written before every timed call (0 on a CPU)."""

    seconds: float
    method: str
    events_s: float | None = None
    graph_s: float | None = None
    graph_error: str | None = None
    calls: int = 0
    flush_bytes: int = 0

    def extra_info(self) -> dict[str, object]:
        """The fields as ``extra_info`` entries (``device_s``, ``device_method``, ...)."""
        return {"device_s": self.seconds, "device_method": self.method, "device_events_s": self.events_s,
                "device_graph_s": self.graph_s, "graph_error": self.graph_error, "device_calls": self.calls,
                "l2_flush_bytes": self.flush_bytes}


def device_time(step: Callable[[], object], device: torch.device, once_s: float, host_median_s: float,
                no_graph: str | None = None) -> DeviceTime:
    """Device time of ``step`` (warmed up; ``once_s`` is one call's host time). ``no_graph``: why
    the step must not be captured in a CUDA graph, or None to try."""
    if device.type != "cuda":
        return DeviceTime(host_median_s, "wall_clock")
    nbytes = flush_bytes(l2_cache_bytes(device))
    buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
    calls = device_calls(once_s)
    events_s = statistics.median(timed_calls(step, calls, buffer.zero_, _cuda_event, torch.cuda.synchronize))
    graph_s, graph_error = None, no_graph
    if no_graph is None:
        try:
            graph_s = statistics.median(_graph_replay_times(step, calls, buffer.zero_))
        except Exception as exc:  # noqa: BLE001  (any capture failure: record it, keep the event time)
            first_line = (str(exc).strip().splitlines() or [""])[0]
            graph_error = f"capture failed: {type(exc).__name__}: {first_line[:300]}"
            torch.cuda.synchronize()
    del buffer
    if graph_s is not None:
        return DeviceTime(graph_s, "cuda_graph", events_s, graph_s, None, calls, nbytes)
    return DeviceTime(events_s, "cuda_events", events_s, None, graph_error, calls, nbytes)


def time_step(benchmark, step: Callable[[], object], device: torch.device, no_graph: str | None = None) -> None:
    """Warm ``step`` up untimed, size rounds to the device's budget, time it with
    ``benchmark.pedantic`` (the host time per call), then measure its device time
    (:func:`device_time`). ``extra_info`` gets the device time fields and ``load_1m``, the machine's
    1-minute load average after the run (other processes on the cores show there)."""
    budget = budget_for(device)
    for _ in range(budget.warmup_calls):
        step()
    start = synchronized_timer()
    step()
    once = max(synchronized_timer() - start, 1e-7)
    for _ in range(min(1000, math.ceil(budget.warmup_s / once))):
        step()
    iterations = max(1, math.ceil(budget.round_s / once))
    rounds = min(budget.max_rounds, max(budget.min_rounds, int(budget.total_s / (once * iterations))))
    benchmark.pedantic(step, rounds=rounds, iterations=iterations, warmup_rounds=1)
    benchmark.extra_info["load_1m"] = os.getloadavg()[0]
    if benchmark.stats is not None:  # None when benchmarks are disabled (--benchmark-disable)
        timing = device_time(step, device, once, benchmark.stats.stats.median, no_graph)
        benchmark.extra_info.update(timing.extra_info())


@dataclass(frozen=True)
class MemoryPeak:
    """Bytes in use at the peak of one step and just before it (``peak - before``: what the step
    itself adds, comparable between CPU and CUDA)."""

    peak_bytes: int
    before_bytes: int

    def extra_info(self) -> dict[str, int]:
        """``peak_memory_bytes`` and ``memory_before_bytes``."""
        return {"peak_memory_bytes": self.peak_bytes, "memory_before_bytes": self.before_bytes}


def memory_peak(step: Callable[[], object], device: torch.device) -> MemoryPeak:
    """Memory of one run of ``step``, after ``gc.collect()`` (cycles left by earlier rows) and, on
    CUDA, ``torch.cuda.empty_cache()`` (nothing cached from earlier rows: flush buffers, graph pools).

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset; ``before`` is every tensor allocated on
    the device when the step starts. CPU: torch.profiler's memory timeline, which follows the
    tensors the step allocates or uses, so ``before`` counts only the live tensors the step reads
    (inputs, weights), not every tensor in the process.
    """
    gc.collect()
    if device.type == "cuda":
        synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize()
        return MemoryPeak(int(torch.cuda.max_memory_allocated(device)), int(before))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export_memory_timeline is deprecated in favour of a CUDA-only tool
        path = os.path.join(tmp, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)
    totals = [sum(s) for s in sizes] or [0]
    return MemoryPeak(int(max(totals)), int(totals[0]))
