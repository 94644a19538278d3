"""The GPU pass: everything that must run on a GPU, in parts that each finish within 10 minutes.

On a machine with a CUDA GPU and torch already installed (offline: the extension is built with
``pip install --no-build-isolation --no-deps --no-index -e .`` when it is missing)::

    python -m benchmarks.gpu_pass --out DIR --part tests      # build, every GPU-marked test, then more
    python -m benchmarks.gpu_pass --out DIR --part sanitize   # compute-sanitizer memcheck + racecheck
    python -m benchmarks.gpu_pass --out DIR --part ops-a      # op benchmarks, first half
    python -m benchmarks.gpu_pass --out DIR --part ops-b      # op benchmarks, second half
    python -m benchmarks.gpu_pass --out DIR --part e2e        # end-to-end benchmarks + a noise re-run
    python -m benchmarks.gpu_pass --out DIR --part llm        # generate / predict of an LLM ensemble, host cost
    python -m benchmarks.gpu_pass --out DIR --part all        # the six in a row (no time limit)
    python -m benchmarks.gpu_pass --list                      # print every step's command

Every step writes its log (and its JSON or JUnit XML) into ``DIR``; ``DIR/summary-<part>.json``
records each step's command, exit status, duration and whether it ran out of time, and
``DIR/env-<part>.txt`` the device (nvidia-smi: name, driver, clocks, temperature, power), Python,
torch (and its git version), CUDA, triton, NumPy, nvcc and compute-sanitizer. Steps are stopped
with SIGINT at their time limit, so pytest still writes its JSON and XML. The exit status is 0 when
every step passed. Merge the benchmark JSONs of one device and dtype into one report with
``python -m benchmarks.report DIR/ops-a.json DIR/ops-b.json DIR/e2e.json DIR/e2e_repeat.json --name <gpu>``:
the repeat's rows are printed once (``e2e.json``'s) and their second times listed under Notes, the
run-to-run spread a difference must beat.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["GPU_PARTS", "PART_BUDGET_S", "Step", "main", "run_part", "steps_for"]

# One part must end within the 10 minutes a command may run on the lent GPU machines.
PART_BUDGET_S = 570
ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
GPU_PARTS = ("tests", "sanitize", "ops-a", "ops-b", "e2e", "llm")


@dataclass(frozen=True)
class Step:
    """One command of a part: its log is ``<name>.log`` in the output folder."""

    name: str
    command: tuple[str, ...]
    timeout_s: int
    env: dict[str, str] = field(default_factory=dict)


def _pytest(*args: str) -> tuple[str, ...]:
    return (PYTHON, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs", *args)


def _sanitizer(tool: str, backend: str, *workload_args: str) -> tuple[str, ...]:
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    return (sanitizer, "--tool", tool, "--error-exitcode", "3", "--target-processes", "all", PYTHON, "-m",
            "benchmarks.sanitize_workload", "--backend", backend, *workload_args)


def _bench(json_path: Path, *args: str) -> tuple[str, ...]:
    return _pytest("--benchmark-only", f"--benchmark-json={json_path}", *args)


def steps_for(part: str, out: Path) -> list[Step]:
    """The steps of ``part``, writing into ``out``."""
    # Every tensor its own allocation (out-of-bounds accesses are not hidden inside a cached segment),
    # and the Triton kernels on their first pruned config (no autotune benchmarking under the sanitizer).
    sanitize_env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "LORA_ENSEMBLE_TRITON_AUTOTUNE": "0"}
    clocks = ("nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw", "--format=csv")
    if part == "tests":
        return [
            Step("gpu_tests", _pytest("tests", "-m", "gpu", "--durations=20", f"--junitxml={out / 'gpu_tests.xml'}"),
                 timeout_s=420),
            # The unmarked Triton, robustness and compile tests also run on the GPU when one is present.
            Step("more_tests", _pytest("tests/test_triton_backend.py", "tests/test_robustness.py",
                                       "tests/test_compile_autocast.py", "-m", "not gpu",
                                       f"--junitxml={out / 'more_tests.xml'}"), timeout_s=300),
        ]
    if part == "sanitize":
        return [
            Step("memcheck_cuda", _sanitizer("memcheck", "cuda"), timeout_s=150, env=sanitize_env),
            Step("memcheck_triton", _sanitizer("memcheck", "triton"), timeout_s=150, env=sanitize_env),
            Step("racecheck_cuda", _sanitizer("racecheck", "cuda"), timeout_s=120, env=sanitize_env),
            Step("racecheck_triton", _sanitizer("racecheck", "triton", "--dtype", "float16"), timeout_s=120,
                 env=sanitize_env),
        ]
    if part in ("ops-a", "ops-b"):
        select = "not llm and not rank" if part == "ops-a" else "llm or rank"
        return [
            Step("clocks_before", clocks, timeout_s=30),
            Step(part, _bench(out / f"{part}.json", "benchmarks/bench_op.py", "-k", select), timeout_s=480),
            Step("clocks_after", clocks, timeout_s=30),
        ]
    if part == "e2e":
        return [
            Step("clocks_before", clocks, timeout_s=30),
            Step("e2e", _bench(out / "e2e.json", "benchmarks/bench_end_to_end.py"), timeout_s=330),
            # The same group again in a fresh process: the run-to-run spread that a difference must beat
            # (without the graphed row, whose compilation would take most of the time).
            Step("e2e_repeat", _bench(out / "e2e_repeat.json", "benchmarks/bench_end_to_end.py", "-k",
                                      "e2e_train and not graphed"), timeout_s=170),
            Step("clocks_after", clocks, timeout_s=30),
        ]
    if part == "llm":
        return [
            Step("clocks_before", clocks, timeout_s=30),
            Step("llm", _bench(out / "llm.json", "benchmarks/bench_llm.py"), timeout_s=420),
            # The overhead table: host cost per call of each backend's layer against F.linear and the composite.
            Step("overhead", (PYTHON, "-m", "benchmarks.bench_overhead", "--json", str(out / "overhead.json")),
                 timeout_s=90),
            Step("clocks_after", clocks, timeout_s=30),
        ]
    raise ValueError(f"unknown part {part!r}; choose one of {GPU_PARTS + ('all',)}")


def _capture(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        return (done.stdout + done.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"({' '.join(command)}: {exc})"


def record_environment(path: Path) -> None:
    """Device, driver, clocks and the software stack, as text."""
    probe = ("import sys, numpy, torch, triton; print('python', sys.version.split()[0]); "
             "print('torch', torch.__version__, torch.version.git_version); print('cuda', torch.version.cuda); "
             "print('triton', triton.__version__); print('numpy', numpy.__version__); "
             "print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')")
    sections = {
        "nvidia-smi": ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,"
                       "temperature.gpu,power.draw,power.limit", "--format=csv"],
        "software": [PYTHON, "-c", probe],
        "nvcc": ["nvcc", "--version"],
        "compute-sanitizer": ["compute-sanitizer", "--version"],
    }
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    path.write_text(f"date {stamp}\n" + "".join(f"\n## {name}\n{_capture(cmd)}\n" for name, cmd in sections.items()))


def ensure_extension(out: Path) -> dict:
    """Build ``lora_ensemble._C`` (offline, every core) when it is missing; the log is ``build.log``."""
    check = [PYTHON, "-c", "import lora_ensemble.backend_cuda as b; assert b.has_cuda_kernels()"]
    if subprocess.run(check, cwd=ROOT, capture_output=True).returncode == 0:
        return {"name": "build", "rc": 0, "seconds": 0.0, "note": "extension already built"}
    build = Step("build", (PYTHON, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-v",
                           "-e", "."), timeout_s=300, env={"MAX_JOBS": str(os.cpu_count() or 1)})
    return run_step(build, out, deadline=time.monotonic() + build.timeout_s)


def run_step(step: Step, out: Path, deadline: float) -> dict:
    """Run ``step`` until it ends or ``deadline`` (SIGINT, then SIGKILL 20 s later); log to ``out``."""
    budget = max(1.0, min(step.timeout_s, deadline - time.monotonic()))
    start = time.monotonic()
    with open(out / f"{step.name}.log", "w") as log:
        log.write("$ " + " ".join(step.command) + "\n")
        log.flush()
        process = subprocess.Popen(step.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **step.env})
        timed_out = False
        try:
            rc = process.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            timed_out = True
            process.send_signal(signal.SIGINT)  # pytest still writes its JSON / XML
            try:
                rc = process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                rc = process.wait()
    seconds = round(time.monotonic() - start, 1)
    print(f"  {step.name:<18} rc={rc:<4} {seconds:>6.1f} s{'  (out of time)' if timed_out else ''}", flush=True)
    return {"name": step.name, "command": list(step.command), "rc": rc, "seconds": seconds, "timed_out": timed_out}


def run_part(part: str, out: Path, budget_s: float = PART_BUDGET_S) -> bool:
    """Run every step of ``part`` within ``budget_s``; True when all passed."""
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s
    print(f"gpu pass, part {part} -> {out}", flush=True)
    record_environment(out / f"env-{part}.txt")
    results = [ensure_extension(out)]
    if results[0]["rc"] == 0:
        for step in steps_for(part, out):
            if deadline - time.monotonic() < 5:
                results.append({"name": step.name, "rc": None, "seconds": 0.0, "note": "no time left"})
                continue
            results.append(run_step(step, out, deadline))
    (out / f"summary-{part}.json").write_text(json.dumps(results, indent=1))
    return all(r["rc"] == 0 for r in results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for logs and JSON (created)")
    parser.add_argument("--part", choices=GPU_PARTS + ("all",), default="all")
    parser.add_argument("--list", action="store_true", help="print the steps' commands and exit")
    args = parser.parse_args(argv)
    parts = GPU_PARTS if args.part == "all" else (args.part,)
    if args.list:
        for part in parts:
            for step in steps_for(part, args.out or Path("DIR")):
                env = " ".join(f"{k}={v}" for k, v in step.env.items())
                prefix = env + " " if env else ""
                print(f"[{part}] {step.name} (<= {step.timeout_s} s): {prefix}{' '.join(step.command)}")
        return 0
    if args.out is None:
        parser.error("--out is required (unless --list)")
    import torch

    if not torch.cuda.is_available():
        print("gpu pass: no CUDA device here; nothing to run", file=sys.stderr)
        return 2
    ok = [run_part(part, args.out, PART_BUDGET_S if args.part != "all" else 3600) for part in parts]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
