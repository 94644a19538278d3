"""The GPU pass: one ~8-minute command that turns a first GPU run into answers, a ~3-minute second
one, and the long parts for when more GPU time is available.

On the GPU machine, from a fresh checkout (offline; the extension is built first when it is missing)::

    python -m benchmarks.gpu_pass --part first --out DIR     # <= 480 s on an H100 (budgets below)
    python -m benchmarks.gpu_pass --part second --out DIR    # <= 180 s, same machine, after first
    python -m benchmarks.gpu_pass --part long --out DIR      # the seven long parts in a row (~1 h)
    python -m benchmarks.gpu_pass --list                     # every step, its budget and command
    python -m benchmarks.gpu_pass --part first --smoke --out DIR   # the same code paths on a CPU

``first``, stage by stage (steps of one stage run at the same time):

1. env: ``python -m lora_ensemble.info`` (versions, driver, device, backends), nvidia-smi, nvcc.
2. the build of the extension for the device's architecture only (``TORCH_CUDA_ARCH_LIST`` = its
   compute capability), beside the Triton kernel tests, which do not need it: every kernel role x
   dtype x precision x backward once, ``LORA_ENSEMBLE_TRITON_AUTOTUNE=0`` (one config per key).
3. ``python -m lora_ensemble.info --check``: every backend against float64 in fp32 / fp16 / bf16,
   stacked and shared, odd shapes, one row per member, and the delta op (its kernels' first run); in
   four processes at once (torch and cuda; Triton per dtype).
4. every CUDA kernel test (``tests/test_cuda_backend.py -m gpu``, opcheck left to CI's meta run).
5. compute-sanitizer memcheck of the CUDA kernels on edge shapes (:mod:`benchmarks.sanitize_workload`).
6. the headline rows (:mod:`benchmarks.headline`, Triton autotuned): ViT-B/32 N=16 r=8 at batch 1
   and 32, fwd and fwd+bwd; Llama q_proj 4096^2 N=16 r=16 at decode and prefill; triton, cuda,
   composite, grouped_mm and F.linear: first-call wait, host, device (L2 flushed) and CUDA-graph
   times, ratio to F.linear, error.

``second``: racecheck of the CUDA kernels (bf16), the compile and CUDA-graph tests, Triton memcheck
(bf16, one config per key: no benchmarking under the sanitizer) and the GPU robustness tests.

Every step has a budget: its process group is stopped with SIGINT at its budget (pytest still writes
its XML; the headline rewrites its JSON after every row), then killed 10 s later. Raw logs go to a
new folder ``<part>-<date>-*`` under ``--logs`` (default: under the system's temp dir); ``--out``
receives three files per part, so the results of both parts come back from a machine that returns at
most 8 files: ``summary-<part>.json`` (each step's command, exit status, time and budget; the check's
and the headline's rows), ``<part>.md`` (the same as tables) and ``logs-<part>.tar.gz`` (every log,
JUnit XML and JSON). The table is printed last. The exit status is 0 when every required step passed.

``--smoke`` runs the same parts on a CPU: each GPU-only step is skipped with its reason, or runs its
CPU stand-in (the same script on tiny inputs, the test selections collected but not run).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["FAST_PARTS", "LONG_PARTS", "PART_BUDGET_S", "Step", "StepResult", "main", "part_budget_s",
           "part_deadline_s", "run_part", "run_stages", "stages_for"]

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
FAST_PARTS = ("first", "second")
LONG_PARTS = ("tests", "sanitize", "ops-a", "ops-b", "e2e", "llm", "first-call")
# What a part may take on an H100, steps' budgets summed stage by stage (the build included): the
# lent machines give 15 minutes of GPU time in all, at most 10 per command, 1-2 of them to start.
PART_BUDGET_S = {"first": 480, "second": 180, **dict.fromkeys(LONG_PARTS, 570)}
KILL_GRACE_S = 10  # after SIGINT at the budget, before SIGKILL

# Every Triton kernel role x dtype x precision x backward once: ViT-sized fwd + bwd in fp32 (3xTF32),
# fp16 and bf16 in both layouts, fp32 with TF32 allowed, bf16 on the odd shapes, the rank parts of
# every member in every pass (row tiles that span members), launches differing only in member count,
# weight grads split over rows (atomics), the fp16 range guards, CUDA-graph replay, column groups.
TRITON_TESTS = ("vit_sized", "bf16_matches", "tf32_allowed", "every_member_in_every_pass", "only_in_member_count",
                "split_over_rows", "beyond_fp16", "graph_replay", "groups_on_the_gpu", "split_k_on_the_gpu")
COMPILE_TESTS = ("cuda_graph_capture", "reduce_overhead_matches")
NO_GPU_STEP = "needs a GPU"


@dataclass(frozen=True)
class Step:
    """One command of a part; its log is ``<name>.log`` in the logs folder.

    ``budget_s``: stopped at this many seconds. ``gpu_only``: why it cannot run without a GPU (None:
    it runs anywhere); ``smoke``: the command ``--smoke`` runs instead on a CPU (None: the command
    itself, or for a GPU-only step nothing).
    ``required``: its failure fails the part (environment probes are not). ``needs_extension``:
    not run when the CUDA extension cannot run on the GPU; ``unless_built``: not run when it can
    (the build itself)."""

    name: str
    command: tuple[str, ...]
    budget_s: int
    env: dict[str, str] = field(default_factory=dict)
    gpu_only: str | None = None
    smoke: tuple[str, ...] | None = None
    required: bool = True
    needs_extension: bool = False
    unless_built: bool = False


Stage = tuple[Step, ...]


def _pytest(*args: str) -> tuple[str, ...]:
    return (PYTHON, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs", *args)


def _workers(count: int) -> tuple[str, ...]:
    """pytest-xdist's ``-n count`` where it is installed (the GPU machines have it): the Triton tests
    spend their time compiling, one core per process."""
    return ("-n", str(count)) if importlib.util.find_spec("xdist") is not None else ()


def _collect(command: tuple[str, ...]) -> tuple[str, ...]:
    """A pytest command's CPU stand-in: collect the same selection (the tests exist, they import),
    in one process."""
    if "-n" in command:
        at = command.index("-n")
        command = command[:at] + command[at + 2:]
    return (*command, "--collect-only")


def _sanitizer(tool: str, *workload: str) -> tuple[str, ...]:
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    extra = ("--racecheck-report", "hazard") if tool == "racecheck" else ()
    return (sanitizer, "--tool", tool, *extra, "--error-exitcode", "3", "--target-processes", "all", PYTHON, "-m",
            "benchmarks.sanitize_workload", *workload)


# Every tensor its own allocation (an access past the end is not hidden inside a cached segment), and
# the Triton kernels on one config (no autotune benchmarking under the sanitizer).
SANITIZE_ENV = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "LORA_ENSEMBLE_TRITON_AUTOTUNE": "0"}
# The sanitizer steps' CPU stand-in: the same workload, torch backend, no sanitizer.
SANITIZE_SMOKE = (PYTHON, "-m", "benchmarks.sanitize_workload", "--backend", "torch", "--device", "cpu", "--dtype",
                  "float32")


def _build(arch: str, budget_s: int) -> Step:
    return Step("build", (PYTHON, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-v", "-e",
                          "."), budget_s, env={"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 1)},
                gpu_only="builds the CUDA extension for the device's architecture", unless_built=True)


def _env_stage(logs: Path) -> Stage:
    clocks = "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit"
    return (
        Step("env", (PYTHON, "-m", "lora_ensemble.info", "--json", str(logs / "env.json")), 10, required=False),
        Step("nvidia_smi", ("nvidia-smi", clocks, "--format=csv"), 10, required=False, gpu_only=NO_GPU_STEP),
        Step("nvcc", ("nvcc", "--version"), 10, required=False, gpu_only="the CUDA toolkit of the GPU machine"),
    )


def _info_checks(logs: Path) -> Stage:
    """``info --check`` in four processes at once: torch and cuda, and Triton per dtype (its kernels'
    compilation, one core each, is most of the check's time); each writes ``info_check*.json``."""
    check = (PYTHON, "-m", "lora_ensemble.info", "--check", "--json")
    triton_only = "compiles the Triton kernels for the GPU (the CPU suite runs them in the interpreter)"
    return (
        Step("info_check", (*check, str(logs / "info_check.json"), "--backend", "torch", "--backend", "cuda"), 45,
             smoke=(*check, str(logs / "info_check.json"), "--backend", "torch", "--device", "cpu")),
        *(Step(f"info_check_triton_{dtype}", (*check, str(logs / f"info_check_triton_{dtype}.json"), "--backend",
                                              "triton", "--dtype", dtype), 45, gpu_only=triton_only)
          for dtype in ("float32", "float16", "bfloat16")),
    )


def _first(logs: Path, arch: str) -> list[Stage]:
    triton_tests = _pytest("tests/test_triton_backend.py", *_workers(4), "-k", " or ".join(TRITON_TESTS),
                           "--durations=10", f"--junitxml={logs / 'triton_tests.xml'}")
    cuda_tests = _pytest("tests/test_cuda_backend.py", "-m", "gpu", "-k", "not opcheck", "--durations=10",
                         f"--junitxml={logs / 'cuda_tests.xml'}")
    headline = (PYTHON, "-m", "benchmarks.headline", "--out", str(logs))
    return [
        _env_stage(logs),
        (_build(arch, 150),
         Step("triton_tests", triton_tests, 150, env={"LORA_ENSEMBLE_TRITON_AUTOTUNE": "0"},
              gpu_only="compiles the Triton kernels for the GPU (the CPU suite runs them in the interpreter)",
              smoke=_collect(triton_tests))),
        _info_checks(logs),
        (Step("cuda_tests", cuda_tests, 55, gpu_only=NO_GPU_STEP, smoke=_collect(cuda_tests), needs_extension=True),),
        (Step("memcheck_cuda", _sanitizer("memcheck", "--backend", "cuda"), 80, env=SANITIZE_ENV,
              gpu_only="compute-sanitizer checks GPU memory accesses", smoke=SANITIZE_SMOKE, needs_extension=True),),
        (Step("headline", headline, 130, env={"TRITON_PRINT_AUTOTUNING": "1"}, gpu_only=NO_GPU_STEP,
              smoke=(*headline, "--smoke")),),
    ]


def _second(logs: Path) -> list[Stage]:
    compile_tests = _pytest("tests/test_compile_autocast.py", "-m", "gpu", "-k", " or ".join(COMPILE_TESTS),
                            f"--junitxml={logs / 'compile_tests.xml'}")
    robustness = _pytest("tests/test_robustness.py", "-m", "gpu", f"--junitxml={logs / 'robustness.xml'}")
    return [
        (Step("nvidia_smi", _env_stage(logs)[1].command, 5, required=False, gpu_only=NO_GPU_STEP),),
        (Step("racecheck_cuda", _sanitizer("racecheck", "--backend", "cuda", "--dtype", "bfloat16"), 60,
              env=SANITIZE_ENV, gpu_only="compute-sanitizer checks shared-memory races on the GPU",
              smoke=SANITIZE_SMOKE, needs_extension=True),),
        (Step("compile_tests", compile_tests, 50, gpu_only=NO_GPU_STEP, smoke=_collect(compile_tests)),),
        (Step("memcheck_triton", _sanitizer("memcheck", "--backend", "triton", "--dtype", "bfloat16"), 40,
              env=SANITIZE_ENV, gpu_only="compute-sanitizer checks GPU memory accesses", smoke=SANITIZE_SMOKE),),
        (Step("robustness", robustness, 25, env={"LORA_ENSEMBLE_TRITON_AUTOTUNE": "0"}, gpu_only=NO_GPU_STEP,
              smoke=_collect(robustness)),),
    ]


def _bench(json_path: Path, *args: str) -> tuple[str, ...]:
    return _pytest("--benchmark-only", f"--benchmark-json={json_path}", *args)


def _long(part: str, logs: Path, arch: str) -> list[Stage]:
    """The seven long parts (each under 10 minutes; about an hour in all), one step per stage, each
    part building the extension first when it is missing."""
    clocks = ("nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw", "--format=csv")
    gpu = {"gpu_only": NO_GPU_STEP}
    if part == "tests":
        steps = [
            Step("gpu_tests", _pytest("tests", "-m", "gpu", "--durations=20", f"--junitxml={logs / 'gpu_tests.xml'}"),
                 420, **gpu),
            # The unmarked Triton, robustness and compile tests also run on the GPU when one is present.
            Step("more_tests", _pytest("tests/test_triton_backend.py", "tests/test_robustness.py",
                                       "tests/test_compile_autocast.py", "-m", "not gpu",
                                       f"--junitxml={logs / 'more_tests.xml'}"), 300, **gpu),
        ]
    elif part == "sanitize":
        steps = [Step(f"{tool}_{backend}", _sanitizer(tool, "--backend", backend, *dtype), budget, env=SANITIZE_ENV,
                      **gpu)
                 for tool, backend, dtype, budget in (("memcheck", "cuda", (), 150), ("memcheck", "triton", (), 150),
                                                      ("racecheck", "cuda", (), 120),
                                                      ("racecheck", "triton", ("--dtype", "float16"), 120))]
    elif part in ("ops-a", "ops-b"):
        select = "not llm and not rank" if part == "ops-a" else "llm or rank"
        steps = [Step("clocks_before", clocks, 30, required=False, **gpu),
                 Step(part, _bench(logs / f"{part}.json", "benchmarks/bench_op.py", "-k", select), 480, **gpu),
                 Step("clocks_after", clocks, 30, required=False, **gpu)]
    elif part == "e2e":
        steps = [Step("clocks_before", clocks, 30, required=False, **gpu),
                 Step("e2e", _bench(logs / "e2e.json", "benchmarks/bench_end_to_end.py"), 330, **gpu),
                 # The same group again in a fresh process: the run-to-run spread that a difference must beat
                 # (without the graphed row, whose compilation would take most of the time).
                 Step("e2e_repeat", _bench(logs / "e2e_repeat.json", "benchmarks/bench_end_to_end.py", "-k",
                                           "e2e_train and not graphed"), 170, **gpu),
                 Step("clocks_after", clocks, 30, required=False, **gpu)]
    elif part == "first-call":
        # A ViT-B/32 ensemble's first result in new processes: key by key, ahead, a second process, pinned.
        steps = [Step("first_forward", (PYTHON, "-m", "benchmarks.first_forward", "--out", str(logs)), 240, **gpu)]
    else:  # llm
        steps = [Step("clocks_before", clocks, 30, required=False, **gpu),
                 Step("llm", _bench(logs / "llm.json", "benchmarks/bench_llm.py"), 420, **gpu),
                 # The overhead table: host cost per call of each backend's layer against F.linear and the composite.
                 Step("overhead", (PYTHON, "-m", "benchmarks.bench_overhead", "--json", str(logs / "overhead.json")),
                      90, **gpu),
                 Step("clocks_after", clocks, 30, required=False, **gpu)]
    return [(_build(arch, 300),)] + [(step,) for step in steps]


def stages_for(part: str, logs: Path, arch: str = "<the device's compute capability>") -> list[Stage]:
    """The stages of ``part`` (the steps of a stage run at the same time), writing into ``logs``;
    ``arch`` is the ``TORCH_CUDA_ARCH_LIST`` the build compiles for."""
    if part == "first":
        return _first(logs, arch)
    if part == "second":
        return _second(logs)
    if part in LONG_PARTS:
        return _long(part, logs, arch)
    raise ValueError(f"unknown part {part!r}; choose one of {FAST_PARTS + LONG_PARTS + ('long',)}")


def part_budget_s(stages: list[Stage]) -> int:
    """What the stages may take at most: each stage's longest budget, summed."""
    return sum(max(step.budget_s for step in stage) for stage in stages)


def part_deadline_s(part: str, stages: list[Stage]) -> int:
    """When ``part`` is stopped: its stages' budgets summed, at most :data:`PART_BUDGET_S` (the long
    parts' steps have room for a slow step as long as the others are quick)."""
    return min(part_budget_s(stages), PART_BUDGET_S[part])


# ---------------------------------------------------------------------------------------------
# Running a part.


@dataclass
class StepResult:
    """What one step did: ``rc`` None when it did not run (``note`` says why; ``needless`` when
    that is no failure: a GPU-only step of a smoke run, a build with the extension already there)."""

    name: str
    budget_s: int
    required: bool
    command: list[str] = field(default_factory=list)
    rc: int | None = None
    seconds: float = 0.0
    timed_out: bool = False
    needless: bool = False
    note: str = ""

    @property
    def ok(self) -> bool:
        """Passed, not required, or not needed."""
        return self.rc == 0 or not self.required or (self.rc is None and self.needless)


def extension_problem() -> str | None:
    """Why the CUDA extension cannot run on this machine's GPU, or None (asked in a fresh process, so
    that a build in this run is seen)."""
    probe = ("import sys, lora_ensemble.backends as b; reason = b.unavailable_reason('cuda', 'cuda'); "
             "print(reason or ''); sys.exit(1 if reason else 0)")
    done = subprocess.run([PYTHON, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if done.returncode == 0:
        return None
    return (done.stdout.strip() or done.stderr.strip().splitlines()[-1:] or ["import failed"])[0][:300]


# Popen's arguments for a child in a process group of its own (not a session of its own: it ends
# with the command that started it). preexec_fn only before Python 3.11 (it is not thread-safe).
_NEW_PROCESS_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


class _Running:
    """A started step: its process, log file and clock."""

    def __init__(self, step: Step, command: tuple[str, ...], logs: Path, budget_s: float) -> None:
        self.step, self.budget_s = step, budget_s
        self.result = StepResult(step.name, step.budget_s, step.required, list(command))
        self.start = time.monotonic()
        self.log = open(logs / f"{step.name}.log", "w")  # noqa: SIM115  (closed in finish)
        self.log.write("$ " + shlex.join([*(f"{k}={v}" for k, v in step.env.items()), *command]) + "\n")
        self.log.flush()
        try:  # its own process group: the sanitizer's and pytest-xdist's children are stopped with it
            self.process: subprocess.Popen | None = subprocess.Popen(
                command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, **_NEW_PROCESS_GROUP,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **step.env})
        except OSError as exc:  # e.g. nvidia-smi or the sanitizer not installed
            self.process = None
            self.result.rc, self.result.note = 127, f"{type(exc).__name__}: {exc}"
            self.log.write(self.result.note + "\n")

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def finish(self) -> StepResult:
        if self.process is not None:
            left = self.budget_s - (time.monotonic() - self.start)
            try:
                self.result.rc = self.process.wait(timeout=max(left, 0.1))
            except subprocess.TimeoutExpired:
                self.result.timed_out = True
                self._signal_group(signal.SIGINT)  # pytest still writes its XML
                try:
                    self.result.rc = self.process.wait(timeout=KILL_GRACE_S)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    self.result.rc = self.process.wait()
                self.result.note = f"stopped at its budget of {self.budget_s:.0f} s"
        self.log.close()
        self.result.seconds = round(time.monotonic() - self.start, 1)
        return self.result


def run_stages(stages: list[Stage], logs: Path, smoke: bool, deadline: float,
               report: Callable[[StepResult], None] = lambda result: None) -> list[StepResult]:
    """Run ``stages`` in order, the steps of one stage at the same time, each within its budget and
    ``deadline`` (``time.monotonic()``); GPU-only steps are skipped (or replaced by their stand-in)
    with ``smoke``."""
    results: list[StepResult] = []
    extension: str | None = None
    checked_extension = False

    def not_run(step: Step, note: str, needless: bool = False) -> None:
        results.append(StepResult(step.name, step.budget_s, step.required, list(step.command), needless=needless,
                                  note=note))
        report(results[-1])

    for stage in stages:
        running = []
        for step in stage:
            command = step.command
            if smoke:
                if step.smoke is None and step.gpu_only is not None:
                    not_run(step, f"skipped (smoke run on a CPU): {step.gpu_only}", needless=True)
                    continue
                command = step.smoke or step.command
            elif step.needs_extension or step.unless_built:
                if not checked_extension:
                    extension, checked_extension = extension_problem(), True
                if step.unless_built and extension is None:
                    not_run(step, "skipped: the extension is built and has kernels for this GPU", needless=True)
                    continue
                if step.needs_extension and extension is not None:
                    not_run(step, f"not run: the CUDA extension cannot run here ({extension})")
                    continue
            left = deadline - time.monotonic()
            if left < 5:
                not_run(step, "not run: the part is out of time")
                continue
            running.append(_Running(step, command, logs, min(step.budget_s, left)))
        for started in running:
            results.append(started.finish())
            report(results[-1])
            if started.step.unless_built:
                checked_extension = False  # a build ran: ask again
    return results


def _print_step(result: StepResult) -> None:
    rc = "-" if result.rc is None else str(result.rc)
    print(f"  {result.name:<16} rc={rc:<4} {result.seconds:>6.1f} s / {result.budget_s:>3} s"
          f"{'  ' + result.note if result.note else ''}", flush=True)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _steps_table(results: list[StepResult]) -> str:
    lines = ["| step | rc | seconds | budget s | note |", "|---|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r.name} | {'' if r.rc is None else r.rc} | {r.seconds:.1f} | {r.budget_s} | {r.note} |")
    return "\n".join(lines)


def _check_summary(check: dict | None) -> str:
    """The info check's counts and every row that did not pass."""
    if check is None:
        return "(no result: the step did not finish)"
    rows = check["check"]
    counts = {status: sum(r["status"] == status for r in rows) for status in ("PASS", "FAIL", "ERROR", "SKIP")}
    lines = [", ".join(f"{n} {status}" for status, n in counts.items())]
    for r in rows:
        if r["status"] != "PASS":
            errors = " ".join(f"{k} {v:.1e}" for k, v in r["errors"].items())
            lines.append(f"- {r['status']} {r['backend']} {r['dtype']} {r['layout']} {r['case']}: {errors} "
                         f"{r['note']}".rstrip())
    return "\n".join(lines)


def write_results(part: str, out: Path, logs: Path, results: list[StepResult], meta: dict) -> str:
    """``summary-<part>.json``, ``<part>.md`` and ``logs-<part>.tar.gz`` in ``out``; returns the markdown."""
    checks = [found for path in sorted(logs.glob("info_check*.json")) if (found := _read_json(path))]
    check = {"check": [row for found in checks for row in found["check"]]} if checks else None
    headline = _read_json(logs / "headline.json")
    summary = {**meta, "steps": [asdict(r) for r in results],
               "info_check": check["check"] if check else None, "headline": headline}
    (out / f"summary-{part}.json").write_text(json.dumps(summary, indent=1))
    sections = [f"# GPU pass, part {part}: {meta['device']}, {meta['date']}",
                f"{meta['seconds']:.0f} s of {meta['budget_s']} s; torch {meta['torch']}, triton {meta['triton']}"
                + ("; smoke run on a CPU" if meta["smoke"] else ""), "", _steps_table(results)]
    if check is not None or any(r.name.startswith("info_check") for r in results):
        sections += ["", "## info --check", "", _check_summary(check)]
    if headline is not None:
        from .headline import HeadlineRow, format_table

        sections += ["", "## headline", "", format_table([HeadlineRow(**row) for row in headline["rows"]])]
    markdown = "\n".join(sections) + "\n"
    (out / f"{part}.md").write_text(markdown)
    with tarfile.open(out / f"logs-{part}.tar.gz", "w:gz") as tar:
        tar.add(logs, arcname=f"logs-{part}")
    return markdown


def _versions() -> dict:
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return {"device": device, "torch": torch.__version__, "triton": triton_version}


def device_arch() -> str:
    """``TORCH_CUDA_ARCH_LIST`` for this machine's first GPU alone, e.g. ``"9.0"``."""
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"


def run_part(part: str, out: Path, logs_root: Path, smoke: bool = False) -> bool:
    """Run every stage of ``part`` within its budget, write the results into ``out`` and the logs
    into a new folder under ``logs_root``; True when every required step passed."""
    out.mkdir(parents=True, exist_ok=True)
    logs_root.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix=f"{part}-{time.strftime('%Y%m%d-%H%M%S')}-", dir=logs_root))
    stages = stages_for(part, logs, "none (smoke)" if smoke else device_arch())
    budget = part_deadline_s(part, stages)
    print(f"gpu pass, part {part}{' (smoke, CPU)' if smoke else ''}: {budget} s at most; logs in {logs}", flush=True)
    start = time.monotonic()
    results = run_stages(stages, logs, smoke, start + budget, _print_step)
    meta = {"part": part, "smoke": smoke, "budget_s": budget, "seconds": round(time.monotonic() - start, 1),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "logs": str(logs), **_versions()}
    markdown = write_results(part, out, logs, results, meta)
    print("\n" + markdown, flush=True)
    return all(r.ok for r in results)


def _list(parts: tuple[str, ...]) -> None:
    for part in parts:
        stages = stages_for(part, Path("LOGS"))
        print(f"[{part}] stages' budgets sum to {part_budget_s(stages)} s; the part stops at "
              f"{part_deadline_s(part, stages)} s")
        for number, stage in enumerate(stages, 1):
            for step in stage:
                env = " ".join(f"{k}={v}" for k, v in step.env.items())
                print(f"  {number}. {step.name} (<= {step.budget_s} s{'' if step.required else ', optional'}): "
                      f"{env + ' ' if env else ''}{shlex.join(step.command)}")
                if step.gpu_only is not None:
                    stand_in = shlex.join(step.smoke) if step.smoke else "skipped"
                    print(f"       GPU only ({step.gpu_only}); --smoke: {stand_in}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=FAST_PARTS + LONG_PARTS + ("long",),
                        help="default: first (with --list: every part)")
    parser.add_argument("--out", type=Path, help="folder for the results: 3 files per part (created)")
    parser.add_argument("--logs", type=Path, help="a new folder per part is made here for the raw logs "
                        "(default: under the temp dir)")
    parser.add_argument("--smoke", action="store_true", help="on a CPU: GPU-only steps skipped or run small")
    parser.add_argument("--list", action="store_true", help="print the steps, budgets and commands, and exit")
    args = parser.parse_args(argv)
    if args.list:
        _list(FAST_PARTS + LONG_PARTS if args.part is None else LONG_PARTS if args.part == "long" else (args.part,))
        return 0
    parts = LONG_PARTS if args.part == "long" else (args.part or "first",)
    if args.out is None:
        parser.error("--out is required (unless --list)")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu pass: no CUDA device here (--smoke runs the same steps on a CPU)", file=sys.stderr)
        return 2
    logs_root = args.logs or Path(tempfile.gettempdir()) / "lora_ensemble_gpu_pass"
    ok = [run_part(part, args.out, logs_root, args.smoke) for part in parts]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
