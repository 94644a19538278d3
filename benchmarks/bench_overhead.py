"""Host cost per call: one LoRA-Ensemble layer on tensors so small that its arithmetic is negligible.

What a call of :class:`FusedLoRAEnsembleLinear` (and of ``fused_lora_ensemble_linear``) costs beyond
its kernels: validation, the backend choice, the autograd node, the launches. Every provider computes
the same layer (N=4 members, 2 sequences of 3 tokens, d = k = 16, rank 4) in the same process:

==================  =====================================================================
``F.linear``        the base layer alone (``F.linear(x, W0, b)``): the floor of any layer
``composite``       what a PyTorch user writes by hand: ``F.linear`` + two ``bmm`` + an add
``module[<b>]``     ``FusedLoRAEnsembleLinear(..., backend=b)``
``functional[<b>]`` ``fused_lora_ensemble_linear(..., backend=b)``
==================  =====================================================================

Modes: ``fwd`` (a training forward: inputs require grad, the autograd graph is recorded) and
``fwd_bwd`` (forward + backward). On a GPU each timed round ends with a synchronisation, so the
kernels' launch and run time is in it; on a CPU the Triton backend would run its interpreter and is
left out, unless ``--stub-devices``: then the ``triton`` and ``cuda`` backends run on the CPU with their
device calls stubbed out (:mod:`benchmarks.device_stubs`: Triton's JIT launch, the extension's ops), as
``module[triton*]``, ``functional[cuda*]`` and so on, with ``auto`` choosing among them and the
composite (``module[auto*]``, ``functional[auto*]``): their launchers' host time, next to the composite.
Run as a script for an interleaved table (providers in turn, min of many rounds)::

    python -m benchmarks.bench_overhead [--stub-devices] [--json PATH]

or under pytest-benchmark with the other benchmarks (``pytest benchmarks/bench_overhead.py --benchmark-only``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import statistics
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lora_ensemble import FusedLoRAEnsembleLinear, available_backends, fused_lora_ensemble_linear

from .device_stubs import STUB_SUFFIX, STUBBED_PARTS, stubbed_device_calls
from .measure import synchronize, synchronized_timer

__all__ = ["MODES", "build_calls", "measure", "overhead_providers"]

pytestmark = pytest.mark.benchmark(timer=synchronized_timer, disable_gc=True)

MODES = ("fwd", "fwd_bwd")
NUM_MEMBERS, BATCH, TOKENS, IN_FEATURES, OUT_FEATURES, RANK = 4, 2, 3, 16, 16, 4


def overhead_providers(device: torch.device, stubbed: tuple[str, ...] = ()) -> list[str]:
    """``F.linear``, ``composite`` and the module and functional form of each backend that runs
    natively on ``device`` (the Triton interpreter is not measured); then those of each backend of
    ``stubbed`` (device calls stubbed, marked ``*``) and of ``auto`` among them and ``torch``."""
    backends = [b for b in available_backends(device)
                if b not in stubbed and (device.type == "cuda" or b != "triton")]
    backends += [b + STUB_SUFFIX for b in (*stubbed, "auto") if stubbed]
    return ["F.linear", "composite"] + [f"{form}[{b}]" for b in backends for form in ("module", "functional")]


def build_calls(device: torch.device, dtype: torch.dtype = torch.float32,
                stubbed: tuple[str, ...] = ()) -> dict[str, Callable[[], Tensor]]:
    """One zero-argument forward per provider, all on the same layer and input."""
    torch.manual_seed(0)
    providers = overhead_providers(device, stubbed)
    layers = {}
    for provider in providers:
        backend = provider[provider.index("[") + 1:-1].removesuffix(STUB_SUFFIX) if "[" in provider else "torch"
        layers[backend] = FusedLoRAEnsembleLinear(IN_FEATURES, OUT_FEATURES, NUM_MEMBERS, RANK, backend=backend,
                                                  device=device, dtype=dtype)
    reference = layers["torch"]
    with torch.no_grad():
        reference.lora_B.normal_()
        for layer in layers.values():
            layer.load_state_dict(reference.state_dict())
    x = torch.randn(NUM_MEMBERS * BATCH, TOKENS, IN_FEATURES, device=device, dtype=dtype, requires_grad=True)
    weight, bias, lora_A, lora_B = reference.weight, reference.bias, reference.lora_A, reference.lora_B

    def composite() -> Tensor:
        base = F.linear(x, weight, bias)
        rows = x.reshape(NUM_MEMBERS, -1, IN_FEATURES)
        delta = torch.bmm(torch.bmm(rows, lora_A.transpose(1, 2)), lora_B.transpose(1, 2))
        return base + reference.scaling * delta.reshape(base.shape)

    calls: dict[str, Callable[[], Tensor]] = {"F.linear": lambda: F.linear(x, weight, bias), "composite": composite}
    for provider in providers[2:]:
        form, backend = provider[:-1].split("[")
        layer = layers[backend.removesuffix(STUB_SUFFIX)]
        if form == "module":
            calls[provider] = lambda layer=layer: layer(x)
        else:
            calls[provider] = lambda layer=layer: fused_lora_ensemble_linear(
                x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, backend=layer.backend)
    return calls


def _step(call: Callable[[], Tensor], mode: str) -> Callable[[], object]:
    if mode == "fwd":
        return call
    return lambda: call().sum().backward()


def measure(device: torch.device, rounds: int = 30, calls_per_round: int = 200,
            stub_devices: bool = False) -> dict[str, dict]:
    """µs per call, ``{mode: {provider: min over rounds}}`` (and ``{mode}_median``), providers
    interleaved in random order. ``stub_devices`` (CPU only) adds the fused backends with their
    device calls stubbed (:func:`benchmarks.device_stubs.stubbed_device_calls`); the backends that
    cannot be stubbed here are listed under ``"skipped"``."""
    results: dict[str, dict] = {}
    with stubbed_device_calls() if stub_devices and device.type == "cpu" else contextlib.nullcontext({}) as skipped:
        stubbed = tuple(b for b in ("triton", "cuda") if b not in skipped) if stub_devices else ()
        calls = build_calls(device, stubbed=stubbed)
        for mode in MODES:
            steps = {name: _step(call, mode) for name, call in calls.items()}
            for step in steps.values():  # warm-up: caches, autotuning, auto's choice, lazy imports
                for _ in range(5):
                    step()
            samples: dict[str, list[float]] = {name: [] for name in steps}
            order = list(steps)
            for _ in range(rounds):
                random.shuffle(order)
                for name in order:
                    step = steps[name]
                    start = synchronized_timer()
                    for _ in range(calls_per_round):
                        step()
                    samples[name].append((synchronized_timer() - start) / calls_per_round * 1e6)
            results[mode] = {name: min(values) for name, values in samples.items()}
            results[f"{mode}_median"] = {name: statistics.median(values) for name, values in samples.items()}
        if stubbed:
            from lora_ensemble.auto_backend import auto_decisions

            results["auto"] = {d.shape.key(): f"{d.backend} ({d.why()})" for d in auto_decisions()}
    if skipped:
        results["skipped"] = dict(skipped)
    if stubbed:
        results["stubbed"] = {backend: STUBBED_PARTS[backend] for backend in stubbed}
    return results


def _table(results: dict[str, dict]) -> str:
    lines = ["| provider | " + " | ".join(f"{m} µs | {m} × composite" for m in MODES) + " |",
             "|---|" + "---:|---:|" * len(MODES)]
    for name in results[MODES[0]]:
        cells = [f"{results[m][name]:.1f} | {results[m][name] / results[m]['composite']:.2f}" for m in MODES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--stub-devices", action="store_true",
                        help="on a CPU: also the triton and cuda backends with their device calls stubbed, and auto")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    load_before = os.getloadavg()
    results = measure(device, rounds=args.rounds, stub_devices=args.stub_devices)
    load = f"1-minute load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread"
    triton_version = getattr(sys.modules.get("triton"), "__version__", "not imported")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"host cost per call (min of {args.rounds} interleaved rounds), {name}, torch {torch.__version__}, "
          f"triton {triton_version}, {date}, {load}")
    print(_table(results))
    for backend, reason in results.get("skipped", {}).items():
        print(f"{backend}: not stubbed: {reason}")
    for shape, choice in results.get("auto", {}).items():
        print(f"auto: {shape} -> {choice}")
    for backend, part in results.get("stubbed", {}).items():
        print(f"{backend}{STUB_SUFFIX}: stubbed: {part}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "triton": triton_version, "date": date,
                       "host": _cpu_name() if device.type == "cpu" else platform.node(), "load": load,
                       "results": results},
                      f, indent=1)
    return 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", overhead_providers(torch.device("cuda" if torch.cuda.is_available() else "cpu")))
def test_overhead(benchmark, provider: str, mode: str) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step = _step(build_calls(device)[provider], mode)
    benchmark.group = f"overhead {mode} | N{NUM_MEMBERS} M{BATCH * TOKENS} d{IN_FEATURES} k{OUT_FEATURES} r{RANK}"
    benchmark.extra_info.update(provider=provider, mode=mode)
    for _ in range(5):
        step()
    benchmark.pedantic(step, rounds=50, iterations=100, warmup_rounds=1)
    synchronize()


if __name__ == "__main__":
    sys.exit(main())
