"""The rows that decide the design, measured in one short run (a step of the first GPU pass)::

    python -m benchmarks.headline --out DIR            # on a GPU: GPU_HEADLINE in bfloat16
    python -m benchmarks.headline --out DIR --smoke    # anywhere: CPU_HEADLINE (tiny), float32, CPU

Rows (:data:`benchmarks.shapes.GPU_HEADLINE`, most decisive first): Llama-7B-class q_proj decode (4096
x 4096, N=16, r=16, one row per member), ViT-B/32 (768 x 768, N=16, r=8) at batch 1 and 32 (50 and
1600 rows per member) for inference and a training step, and the q_proj prefill (512 rows per
member). Providers (:mod:`benchmarks.providers`, on the same inputs): ``triton``, ``cuda``, ``bmm``
(the composite ``torch`` backend), ``grouped_mm`` (PyTorch's grouped GEMM) and ``limit``
(``F.linear`` over the same rows: a model at N times the batch). Per provider:

==============  ======================================================================================
``first_s``     the first call, synchronised: Triton's autotuning and compilation, cuBLAS's heuristics
``host_us``     host time per call with the GPU kept busy before each call (``torch.cuda._sleep``), so
                only Python, dispatch and launches are timed (:func:`benchmarks.measure.timed_calls`
                with host-clock events)
``device_us``   device time per call, L2 flushed before each call (CUDA events,
                :func:`benchmarks.measure.device_time`)
``graph_us``    the same for replays of the step captured in a CUDA graph (or why capture failed)
``x_linear``    device time over ``limit``'s, same shape and mode (graph over graph where both were
                captured, else events over events)
``error``       the largest :func:`lora_ensemble.reference.relative_error` of the output (and of
                ``dx``, ``dA``, ``dB`` in ``fwd_bwd``) against float64
==============  ======================================================================================

On a CPU (``--smoke``) there is no separate device: every time is the host's wall clock and nothing
is captured. ``DIR/headline.json`` is rewritten after every provider, so a run stopped at its time
limit keeps what it measured; ``DIR/headline.md`` holds the table, which is also printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import lora_ensemble
from lora_ensemble import available_backends
from lora_ensemble.reference import lora_ensemble_reference, lora_ensemble_reference_backward, relative_error
from tests.utils import make_inputs

from .machine import device_name
from .measure import WallEvent, device_time, synchronize, synchronized_timer, timed_calls
from .providers import build_op_run, make_step, provider_unavailable_reason
from .shapes import CPU_HEADLINE, GPU_HEADLINE, OpShape

__all__ = ["HEADLINE_PROVIDERS", "HeadlineRow", "format_table", "main", "measure_rows"]

HEADLINE_PROVIDERS: tuple[str, ...] = ("triton", "cuda", "bmm", "grouped_mm", "limit")
HOST_CALLS = 30
GPU_BUSY_CYCLES = 500_000  # ~0.3 ms of GPU spin before each host-timed call: longer than any call's host cost


@dataclass
class HeadlineRow:
    """One provider on one shape and mode; times in seconds (None: not measured, ``skipped`` or
    ``failed`` says why)."""

    shape: str
    mode: str
    provider: str
    first_s: float | None = None
    host_s: float | None = None
    device_s: float | None = None
    graph_s: float | None = None
    x_linear: float | None = None
    error: float | None = None
    errors: dict[str, float] = field(default_factory=dict)
    graph_error: str | None = None
    skipped: str | None = None
    failed: str | None = None


def _once_s(step: Callable[[], object]) -> float:
    """Median of three warm calls, synchronised."""
    times = []
    for _ in range(3):
        start = synchronized_timer()
        step()
        times.append(synchronized_timer() - start)
    return statistics.median(times)


def _host_s(step: Callable[[], object], device: torch.device) -> float:
    busy = (lambda: torch.cuda._sleep(GPU_BUSY_CYCLES)) if device.type == "cuda" else (lambda: None)
    return statistics.median(timed_calls(step, HOST_CALLS, busy, WallEvent, synchronize))


def _errors(run, mode: str, reference: dict[str, torch.Tensor], grad_out: torch.Tensor | None) -> dict[str, float]:
    if mode == "fwd":
        with torch.no_grad():
            return {"out": relative_error(run.forward(), reference["out"])}
    out = run.forward()
    grads = torch.autograd.grad(out, run.trainable, grad_out)
    errors = {"out": relative_error(out.detach(), reference["out"])}
    errors.update({name: relative_error(g, reference[name]) for name, g in zip(("dx", "dA", "dB"), grads)})
    return errors


def _measure(provider: str, shape: OpShape, mode: str, inputs, reference: dict[str, torch.Tensor],
             grad_out: torch.Tensor | None, device: torch.device) -> HeadlineRow:
    row = HeadlineRow(str(shape), mode, provider)
    row.skipped = provider_unavailable_reason(provider, device, inputs.x.dtype, shape)
    if row.skipped is not None:
        return row
    try:
        run = build_op_run(provider, inputs.x, inputs.weight, inputs.bias, inputs.lora_A, inputs.lora_B,
                           inputs.scaling, seq_len=shape.sequence_length)
        step = make_step(run, mode)
        start = synchronized_timer()
        step()
        row.first_s = synchronized_timer() - start
        if provider != "limit":  # limit computes the layer without LoRA: nothing to compare
            row.errors = _errors(run, mode, reference, grad_out)
            row.error = max(row.errors.values())
        once = _once_s(step)
        row.host_s = _host_s(step, device)
        timing = device_time(step, device, once, row.host_s)
        row.device_s = timing.events_s if timing.events_s is not None else timing.seconds
        row.graph_s, row.graph_error = timing.graph_s, timing.graph_error
    except Exception as exc:  # noqa: BLE001  (a crash is a finding: record it, measure the next one)
        row.failed = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return row


def _reference(inputs, mode: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    args = (inputs.x, inputs.weight, inputs.bias, inputs.lora_A, inputs.lora_B, inputs.scaling)
    reference = {"out": lora_ensemble_reference(*args)}
    if mode == "fwd":
        return reference, None
    grad_out = torch.randn(reference["out"].shape, device=inputs.x.device, dtype=inputs.x.dtype)
    grads = lora_ensemble_reference_backward(grad_out, inputs.x, inputs.weight, inputs.lora_A, inputs.lora_B,
                                             inputs.scaling)
    reference.update(dx=grads.x, dA=grads.lora_A, dB=grads.lora_B)
    return reference, grad_out


def _add_ratios(rows: list[HeadlineRow]) -> None:
    """``x_linear`` of each measured row: graph time over limit's where both were captured, else
    event time over event time."""
    limit = next((r for r in rows if r.provider == "limit" and r.device_s), None)
    for row in rows:
        if limit is not None and row.device_s:
            both_graphed = row.graph_s and limit.graph_s
            row.x_linear = row.graph_s / limit.graph_s if both_graphed else row.device_s / limit.device_s


def measure_rows(rows: list[tuple[OpShape, tuple[str, ...]]], device: torch.device, dtype: torch.dtype,
                 providers: tuple[str, ...] = HEADLINE_PROVIDERS,
                 written: Callable[[list[HeadlineRow]], None] = lambda rows: None) -> list[HeadlineRow]:
    """Every provider on every (shape, modes) of ``rows``; ``written`` is called with the results so
    far after each provider (to save them)."""
    results: list[HeadlineRow] = []
    F.linear(torch.ones(8, 8, device=device, dtype=dtype), torch.ones(8, 8, device=device, dtype=dtype))  # BLAS init
    available_backends(device)  # loads the backends' modules (and the extension) before any first call
    for shape, modes in rows:
        for mode in modes:
            torch.manual_seed(0)
            inputs = make_inputs(shape.num_members, shape.rows, shape.d, shape.k, shape.rank, dtype=dtype,
                                 device=device, scaling=1.0)
            reference, grad_out = _reference(inputs, mode)
            group = []
            for provider in providers:
                group.append(_measure(provider, shape, mode, inputs, reference, grad_out, device))
                _add_ratios(group)
                written(results + group)
            results += group
            del inputs, reference, grad_out
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def _us(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e6:.1f}"


def format_table(rows: list[HeadlineRow]) -> str:
    """The rows as a markdown table; skipped and failed providers say why."""
    lines = ["| shape | mode | provider | first s | host µs | device µs | graph µs | × F.linear | error |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r.shape} | {r.mode} | {r.provider} |"
        if r.skipped or r.failed:
            why = f"skipped: {r.skipped}" if r.skipped else f"FAILED: {r.failed}"
            lines.append(f"{head} {why} | | | | | |")
            continue
        lines.append(f"{head} {r.first_s:.2f} | {_us(r.host_s)} | {_us(r.device_s)} | "
                     f"{_us(r.graph_s) or 'no graph'} | {'' if r.x_linear is None else f'{r.x_linear:.2f}'} | "
                     f"{'' if r.error is None else f'{r.error:.1e}'} |")
    return "\n".join(lines)


def _write(out: Path, meta: dict, rows: list[HeadlineRow]) -> None:
    (out / "headline.json").write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for headline.json and headline.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (a check of this script)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("headline: no CUDA device here (use --smoke for the CPU check)", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.smoke else torch.device("cuda")
    if device.type == "cpu":
        torch.set_num_threads(1)  # as the CPU benchmarks: OpenMP barriers on shared cores swamp tiny ops
    dtype = torch.float32 if args.smoke else torch.bfloat16
    rows = CPU_HEADLINE if args.smoke else GPU_HEADLINE
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_name(device), "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
            "cuda": torch.version.cuda, "lora_ensemble": lora_ensemble.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    start = time.perf_counter()
    results = measure_rows(rows, device, dtype, written=lambda so_far: _write(args.out, meta, so_far))
    meta["seconds"] = round(time.perf_counter() - start, 1)
    _write(args.out, meta, results)
    table = format_table(results)
    (args.out / "headline.md").write_text(
        f"Headline rows on {meta['device']}, {meta['dtype']}, torch {meta['torch']}, triton {meta['triton']}, "
        f"{meta['date']} ({meta['seconds']} s)\n\n{table}\n")
    print(table)
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
