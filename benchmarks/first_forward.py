"""First-call wait of a whole model: a ViT-B/32 LoRA-Ensemble (16 members, rank 8, bf16, batch 1, Triton
backend) in a new process, until its first result, with and without its kernels compiled ahead.

Issue 22's goal on an H100: the first forward <= 3 s including compilation, <= 0.5 s in a second
process. Each variant runs in a process of its own, started after the previous one ended:

================  ===========================================================================
variant           what the process does
================  ===========================================================================
``key_by_key``    empty caches (Triton's and the tuning folder): the step; each Triton key compiles
                  its best configs and times them at its first call, one key after another
``ahead``         empty caches: the step inside ``lora_ensemble.compiling_ahead()`` (the composite
                  computes it while every key's configs compile together), then the step
``second``        the caches ``ahead`` left (stored winners, Triton's disk cache): the step
``pinned``        empty caches, ``LORA_ENSEMBLE_TRITON_AUTOTUNE=0``: the step; each key compiles the
                  cost model's first config at its first call, nothing timed
================  ===========================================================================

for two steps: ``e2e_infer`` (a forward without autograd) and ``e2e_train`` (forward, cross-entropy,
the LoRA factors' gradients). ``first_s`` is the wait from before the variant's first call to the
step's first fused result (synchronised; the model is built and the imports done before), ``step_s``
one more step after it; ``build_s`` the model's building before it (built and wrapped on the CPU,
then moved to the GPU, as a pretrained model is: Triton's once-a-process cache key is hashed on a
thread from the wrapping on, ``lora_ensemble/triton_hash.py``; ``hash_wait_s`` is what of it
``first_s`` still waited for).
``--smoke`` runs the same processes on the CPU (a tiny ViT, the composite).

Run as ``python -m benchmarks.first_forward --out DIR`` (writes ``first_forward.{json,md}``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["VARIANTS", "main", "run_variant"]

VARIANTS = ("key_by_key", "ahead", "second", "pinned")
STEPS = ("e2e_infer", "e2e_train")
_TIMEOUT_S = 150  # one process


def run_variant(variant: str, step_name: str, smoke: bool) -> dict:
    """Build the model, run ``variant`` of ``step_name`` (this process's caches are the caller's) and
    return its times."""
    from lora_ensemble import compiling_ahead
    from lora_ensemble.triton_hash import hash_wait_s

    from .e2e_models import build_e2e_run, make_e2e_step
    from .measure import synchronized_timer
    from .shapes import CPU_E2E, GPU_E2E

    device = torch.device("cpu" if smoke else "cuda")
    shape, dtype = (CPU_E2E, torch.float32) if smoke else (GPU_E2E, torch.bfloat16)
    start = time.perf_counter()  # not synchronised: CUDA's initialisation belongs to the build, as for a user
    run = build_e2e_run("bmm" if smoke else "triton", shape, device, dtype)
    build_s = synchronized_timer() - start
    generator = torch.Generator(device).manual_seed(0)
    images = torch.randn(1, 3, shape.image_size, shape.image_size, device=device, dtype=dtype, generator=generator)
    labels = torch.randint(0, shape.num_classes, (shape.num_members,), device=device, generator=generator)
    step = make_e2e_step(run, step_name, images, labels)
    result: dict = {"variant": variant, "step": step_name, "build_s": build_s}
    start = synchronized_timer()
    if variant == "ahead":
        with compiling_ahead() as ahead:
            step()
        result["ahead"] = ahead.summary()
        result["ahead_block_s"] = synchronized_timer() - start
    step()
    result["first_s"] = synchronized_timer() - start
    result["hash_wait_s"] = hash_wait_s()
    start = synchronized_timer()
    step()
    result["step_s"] = synchronized_timer() - start
    return result


def _in_new_process(variant: str, step_name: str, smoke: bool, caches: Path) -> dict:
    from lora_ensemble.tuning_store import CACHE_DIR_VARIABLE, PIN_VARIABLE

    env = {**os.environ, "TRITON_CACHE_DIR": str(caches / "triton"), CACHE_DIR_VARIABLE: str(caches / "tuning")}
    env.pop(PIN_VARIABLE, None)
    if variant == "pinned":
        env[PIN_VARIABLE] = "0"
    command = [sys.executable, "-m", "benchmarks.first_forward", "--variant", variant, "--step", step_name]
    started = time.perf_counter()
    try:
        done = subprocess.run([*command, *(["--smoke"] if smoke else [])], env=env, capture_output=True, text=True,
                              timeout=_TIMEOUT_S, cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "step": step_name, "failed": f"no result within {_TIMEOUT_S} s"}
    if done.returncode != 0:
        return {"variant": variant, "step": step_name, "failed": done.stderr.strip()[-600:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    return result


def _table(results: list[dict]) -> str:
    lines = ["| step | variant | model built (s) | first result (s) | of it, the ahead block (s) | of it, Triton's "
             "key (s) | next step (ms) | process (s) | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['step']} | {r['variant']} | | | | | | | failed: {r['failed'].splitlines()[-1][:120]} |")
            continue
        block = f"{r['ahead_block_s']:.2f}" if "ahead_block_s" in r else ""
        lines.append(f"| {r['step']} | {r['variant']} | {r['build_s']:.2f} | {r['first_s']:.2f} | {block} | "
                     f"{r['hash_wait_s']:.2f} | {r['step_s'] * 1e3:.1f} | {r['process_s']:.1f} | "
                     f"{r.get('ahead', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for first_forward.json and first_forward.md")
    parser.add_argument("--smoke", action="store_true", help="a tiny ViT on the CPU, the composite (a check)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in this process
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant is not None:
        print(json.dumps(run_variant(args.variant, args.step, args.smoke)))
        return 0
    if args.out is None:
        parser.error("--out is required")
    if not args.smoke and not torch.cuda.is_available():
        print("first_forward: no CUDA device here (use --smoke for the CPU check)", file=sys.stderr)
        return 2
    from .machine import device_name

    meta = {"device": device_name(torch.device("cpu" if args.smoke else "cuda")), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu_count": os.cpu_count()}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    results = []
    args.out.mkdir(parents=True, exist_ok=True)
    for step_name in STEPS:
        with tempfile.TemporaryDirectory(prefix="first_forward_") as folder:
            for variant in VARIANTS:  # second reuses the caches ahead left; the others start empty
                caches = Path(folder) / ("ahead" if variant == "second" else variant)
                results.append(_in_new_process(variant, step_name, args.smoke, caches))
                # Rewritten after every process: a run stopped at its budget keeps what it measured.
                (args.out / "first_forward.json").write_text(
                    json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    table = _table(results)
    (args.out / "first_forward.md").write_text(
        f"First-call wait of a ViT-B/32 LoRA-Ensemble on {meta['device']}, torch {meta['torch']}, triton "
        f"{meta['triton']}, {meta['cpu_count']} CPUs, {meta['date']}\n\n{table}\n")
    print(table)
    return 1 if any("failed" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
