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
left out. Run as a script for an interleaved table (providers in turn, min of many rounds)::

    python -m benchmarks.bench_overhead [--json PATH]

or under pytest-benchmark with the other benchmarks (``pytest benchmarks/bench_overhead.py --benchmark-only``).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lora_ensemble import FusedLoRAEnsembleLinear, available_backends, fused_lora_ensemble_linear

from .measure import synchronize, synchronized_timer

__all__ = ["MODES", "build_calls", "measure", "overhead_providers"]

pytestmark = pytest.mark.benchmark(timer=synchronized_timer, disable_gc=True)

MODES = ("fwd", "fwd_bwd")
NUM_MEMBERS, BATCH, TOKENS, IN_FEATURES, OUT_FEATURES, RANK = 4, 2, 3, 16, 16, 4


def overhead_providers(device: torch.device) -> list[str]:
    """``F.linear``, ``composite`` and the module and functional form of each backend that runs
    natively on ``device`` (the Triton interpreter is not measured)."""
    backends = [b for b in available_backends(device) if device.type == "cuda" or b != "triton"]
    return ["F.linear", "composite"] + [f"{form}[{b}]" for b in backends for form in ("module", "functional")]


def build_calls(device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, Callable[[], Tensor]]:
    """One zero-argument forward per provider, all on the same layer and input."""
    torch.manual_seed(0)
    layers = {}
    for provider in overhead_providers(device):
        backend = provider[provider.index("[") + 1:-1] if "[" in provider else "torch"
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
    for provider in overhead_providers(device)[2:]:
        form, backend = provider[:-1].split("[")
        layer = layers[backend]
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


def measure(device: torch.device, rounds: int = 30, calls_per_round: int = 200) -> dict[str, dict[str, float]]:
    """µs per call, ``{mode: {provider: min over rounds}}``, providers interleaved in random order."""
    calls = build_calls(device)
    results: dict[str, dict[str, float]] = {}
    for mode in MODES:
        steps = {name: _step(call, mode) for name, call in calls.items()}
        for step in steps.values():  # warm-up: caches, autotuning, lazy imports
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
    return results


def _table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| provider | " + " | ".join(f"{m} µs | {m} × composite" for m in MODES) + " |",
             "|---|" + "---:|---:|" * len(MODES)]
    for name in results[MODES[0]]:
        cells = [f"{results[m][name]:.1f} | {results[m][name] / results[m]['composite']:.2f}" for m in MODES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    results = measure(device, rounds=args.rounds)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread"
    print(f"host cost per call (min of {args.rounds} interleaved rounds), {name}, torch {torch.__version__}")
    print(_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "results": results}, f, indent=1)
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
