"""``python -m lora_ensemble.info``: what this machine runs, and with ``--check`` whether every backend
computes the op correctly here. The first thing to run on a new GPU::

    python -m lora_ensemble.info                 # versions, devices, the extension, backends, auto
    python -m lora_ensemble.info --check         # + a self-test of every available backend
    python -m lora_ensemble.info --check --json info.json --backend triton --dtype bfloat16

The report: lora_ensemble, Python, torch (and its git version), CUDA, triton and NumPy versions; the
NVIDIA driver; every CUDA device with its compute capability; what the compiled extension
``lora_ensemble._C`` was built for (``TORCH_CUDA_ARCH_LIST``) and whether it has kernels for each
device; every backend on every device and, where it cannot run, why; what ``backend="auto"`` picks
per device and dtype, and why.

The check (:func:`check`) runs, on one device (the first GPU, else the CPU), every backend that can
run there against the float64 reference (:mod:`lora_ensemble.reference`): forward and backward
(``dx``, ``dA``, ``dB``; ``d base`` for the delta op), float32 / float16 / bfloat16, stacked and
shared input, over the odd shapes of :data:`CHECK_CASES` (one row per member, ragged tiles, rank 33,
and the delta op over a given base). Each result's error is the largest of
``|got - want| / (RMS(want) + |want|)`` over its elements (:func:`lora_ensemble.reference.relative_error`),
against a bound per dtype (:func:`error_bound`).
Triton runs one config per kernel during the check (``LORA_ENSEMBLE_TRITON_AUTOTUNE=0`` unless set):
compiling every candidate would take minutes. On a CPU the Triton backend runs only under
``TRITON_INTERPRET=1``, and not in bfloat16 (the interpreter's bf16 ``tl.dot`` is wrong). The exit
status is 1 when any row fails.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__
from .auto_backend import MEASURE_VARIABLE, format_auto_decisions
from .auto_costs import format_estimates
from .backends import _AUTO_CUDA_ORDER, BACKENDS, FUSED_DTYPES, auto_candidates, unavailable_reason
from .functional import fused_lora_ensemble_linear, lora_ensemble_delta
from .kernels.gpu_specs import gpu_spec
from .reference import (
    lora_delta_reference,
    lora_delta_reference_backward,
    lora_ensemble_reference,
    lora_ensemble_reference_backward,
    relative_error,
)
from .tuning_store import CACHE_DIR_VARIABLE, PIN_VARIABLE, SPLIT_K_VARIABLE, tuning_store

__all__ = ["AUTOTUNE_SWITCH", "CHECK_CASES", "AutoChoice", "CheckCase", "CheckRow", "auto_choice", "check",
           "error_bound", "format_check", "main", "report"]

AUTOTUNE_SWITCH = PIN_VARIABLE  # LORA_ENSEMBLE_TRITON_AUTOTUNE
INTERPRETER_BF16 = "bf16 tl.dot is silently wrong in the Triton interpreter (triton#11584): checked on a GPU only"
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


# ---------------------------------------------------------------------------------------------
# The report.


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError as exc:
        return f"not installed ({exc})"


def driver_version() -> str:
    """The NVIDIA kernel module's version (``/proc/driver/nvidia/version``) and the CUDA driver API
    version (``cuDriverGetVersion`` of ``libcuda``), as far as they can be read."""
    parts = []
    with contextlib.suppress(OSError):
        found = re.search(r"Kernel Module\s+(\S+)", Path("/proc/driver/nvidia/version").read_text())
        if found:
            parts.append(f"NVIDIA {found.group(1)}")
    with contextlib.suppress(OSError, AttributeError):
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            parts.append(f"CUDA driver API {version.value // 1000}.{version.value % 1000 // 10}")
    return ", ".join(parts) or "no NVIDIA driver found"


def cuda_devices() -> list[torch.device]:
    """Every CUDA device torch sees (none without a GPU; CUDA is not initialised then)."""
    if not torch.cuda.is_available():
        return []
    return [torch.device("cuda", index) for index in range(torch.cuda.device_count())]


def _device_line(device: torch.device) -> str:
    props = torch.cuda.get_device_properties(device)
    return (f"{device}  {props.name}  sm_{props.major}{props.minor}  {props.multi_processor_count} SMs  "
            f"{props.total_memory / 2**30:.1f} GiB")


def _extension_lines(devices: list[torch.device]) -> list[str]:
    """What ``lora_ensemble._C`` was built for, and whether it has kernels for each device."""
    reason = unavailable_reason("cuda")
    try:
        from . import backend_cuda
    except (ImportError, OSError, RuntimeError) as exc:
        return [f"not loaded: {exc}"]
    lines = [f"built for TORCH_CUDA_ARCH_LIST={';'.join(backend_cuda.build_archs())}"]
    if reason is not None and not devices:
        lines.append(f"not usable here: {reason}")
    for device in devices:
        problem = backend_cuda.device_problem(device.index)
        lines.append(f"{device}: {'kernels for this device' if problem is None else problem}")
    return lines


@dataclass(frozen=True)
class AutoChoice:
    """What ``backend="auto"`` runs for one device and dtype, and why."""

    device: str
    dtype: str
    backend: str
    why: str


def auto_choice(device: torch.device, dtype: torch.dtype) -> AutoChoice:
    """What ``auto`` runs on ``device`` for ``dtype``: one backend, or ``"per shape"`` where it chooses
    per shape class among several (:mod:`lora_ensemble.auto_backend`), and the rule."""
    candidates = auto_candidates(device, dtype)
    backend = candidates[0] if len(candidates) == 1 else "per shape"
    if device.type != "cuda":
        why = "tensors off the GPU run the composite torch backend"
    elif dtype not in FUSED_DTYPES:
        why = f"the fused backends take {', '.join(DTYPE_NAMES[d] for d in FUSED_DTYPES)} only"
    else:
        why = (f"the fastest of {', '.join(candidates)} per shape class: measured once on this machine, else "
               "modelled" if len(candidates) > 1 else "the only backend that runs here")
        why += "".join(f"; not {name}: {unavailable_reason(name, device)}" for name in _AUTO_CUDA_ORDER
                       if name not in candidates)
    return AutoChoice(str(device), DTYPE_NAMES.get(dtype, str(dtype)), backend, why)


def _per_shape_lines(devices: list[torch.device]) -> list[str]:
    """The per-shape choices of this process, the tuning file of each GPU, and the cost model's view of
    the headline shapes on each GPU."""
    lines = ["per-shape choices of this process:", *(f"  {line}" for line in format_auto_decisions())]
    for device in devices:
        store = tuning_store(device)
        lines.append(f"{device} tuning file: {store.path or 'none (LORA_ENSEMBLE_CACHE_DIR is empty)'} "
                     f"({store.summary()})")
        lines += format_estimates(gpu_spec(device)).splitlines()
    return lines


def report() -> str:
    """The text of ``python -m lora_ensemble.info`` (without the check)."""
    devices = cuda_devices()
    all_devices = [torch.device("cpu"), *devices]
    lines = [
        f"lora_ensemble {__version__}  ({Path(__file__).resolve().parent})",
        f"python {sys.version.split()[0]}  torch {torch.__version__} (git {torch.version.git_version[:12]})  "
        f"CUDA {torch.version.cuda or 'none (CPU build of torch)'}  triton {_version('triton')}  "
        f"numpy {_version('numpy')}",
        f"driver: {driver_version()}",
        "",
        "devices",
        *(f"  {_device_line(d)}" for d in devices),
        *(["  no CUDA device (torch.cuda.is_available() is False)"] if not devices else []),
        "",
        "extension lora_ensemble._C",
        *(f"  {line}" for line in _extension_lines(devices)),
        "",
        "backends",
    ]
    for name in BACKENDS:
        for device in all_devices:
            reason = unavailable_reason(name, device)
            lines.append(f"  {name:<7} {str(device):<7} " + ("runs" if reason is None else f"no: {reason}"))
    lines += ["", 'auto (what backend="auto" picks, and why)']
    for device in all_devices:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            choice = auto_choice(device, dtype)
            lines.append(f"  {choice.device:<7} {choice.dtype:<9} {choice.backend:<7} {choice.why}")
    lines += [f"  {line}" for line in _per_shape_lines(devices)]
    switches = ("TRITON_INTERPRET", AUTOTUNE_SWITCH, CACHE_DIR_VARIABLE, MEASURE_VARIABLE, SPLIT_K_VARIABLE)
    lines += ["", "switches: " + "  ".join(f"{name}={os.environ.get(name, '(unset)')}" for name in switches)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The check.


@dataclass(frozen=True)
class CheckCase:
    """One shape of the check: ``N`` members, ``M`` rows per member, ``d`` in, ``k`` out, rank ``r``;
    ``op`` is ``"linear"`` (``fused_lora_ensemble_linear``) or ``"delta"`` (``lora_ensemble_delta``)."""

    label: str
    op: str
    num_members: int
    rows: int
    d: int
    k: int
    rank: int


# Odd sizes everywhere (no multiple of 16; d and k not 16-byte aligned in 16-bit dtypes for rank 33).
CHECK_CASES: tuple[CheckCase, ...] = (
    CheckCase("1 row/member, r33", "linear", 4, 1, 20, 36, 33),
    CheckCase("ragged tiles, r8", "linear", 3, 37, 72, 100, 8),
    CheckCase("delta op, r5", "delta", 3, 19, 40, 24, 5),
)


def error_bound(dtype: torch.dtype, device: torch.device) -> float:
    """The largest :func:`~lora_ensemble.reference.relative_error` a correct backend shows in
    ``dtype``: a few roundings to the dtype (unit roundoff 2^-24, 2^-11, 2^-8) with a margin (cuBLAS
    may reduce fp16 products in fp16, PyTorch's default); TF32 dots (float32 on a GPU when PyTorch
    allows TF32 matmuls) round their inputs to 10 mantissa bits. A wrong tile, member or scaling
    gives errors of order 1."""
    if dtype == torch.float32:
        tf32 = device.type == "cuda" and torch.get_float32_matmul_precision() != "highest"
        return 5e-3 if tf32 else 1e-5
    return {torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype]


@dataclass
class CheckRow:
    """One backend, dtype, layout and case: its errors per result, the bound, and the outcome
    (``PASS``, ``FAIL``, ``SKIP`` with the reason, or ``ERROR`` with the exception)."""

    backend: str
    device: str
    dtype: str
    layout: str
    case: str
    status: str
    bound: float
    errors: dict[str, float] = field(default_factory=dict)
    note: str = ""


def _inputs(case: CheckCase, shared: bool, dtype: torch.dtype, device: torch.device,
            seed: int) -> tuple[dict[str, torch.Tensor], float]:
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        values = torch.randn(*shape, generator=generator) * scale
        return values.to(device=device, dtype=dtype).requires_grad_()

    n, m, d, k, r = case.num_members, case.rows, case.d, case.k, case.rank
    rows = m if shared else n * m
    tensors = {"x": rand(rows, d), "lora_A": rand(n, r, d, scale=d**-0.5), "lora_B": rand(n, k, r, scale=r**-0.5)}
    if case.op == "linear":
        tensors.update(weight=rand(k, d, scale=d**-0.5).detach(), bias=rand(k).detach())
    else:
        tensors["base"] = rand(rows, k)
    return tensors, 0.7


def _errors(case: CheckCase, shared: bool, backend: str, dtype: torch.dtype, device: torch.device,
            seed: int) -> dict[str, float]:
    """Relative errors of ``backend``'s output and gradients against the float64 reference."""
    t, s = _inputs(case, shared, dtype, device, seed)
    if case.op == "linear":
        out = fused_lora_ensemble_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], s,
                                         shared_input=shared, backend=backend)
        want = lora_ensemble_reference(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], s, shared)
        names = ("x", "lora_A", "lora_B")
    else:
        out = lora_ensemble_delta(t["x"], t["base"], t["lora_A"], t["lora_B"], s, shared_input=shared,
                                  backend=backend)
        want = lora_delta_reference(t["x"], t["base"], t["lora_A"], t["lora_B"], s, shared)
        names = ("x", "base", "lora_A", "lora_B")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    grads = torch.autograd.grad(out, [t[name] for name in names], grad_out)
    if case.op == "linear":
        want_grads = lora_ensemble_reference_backward(grad_out, t["x"], t["weight"], t["lora_A"], t["lora_B"], s,
                                                      shared)
    else:
        want_grads = lora_delta_reference_backward(grad_out, t["x"], t["lora_A"], t["lora_B"], s, shared)
    errors = {"out": relative_error(out, want)}
    for name, grad in zip(names, grads):
        errors[f"d{name.removeprefix('lora_')}"] = relative_error(grad, getattr(want_grads, name))
    return errors


def _skip_reason(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    if backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
        return INTERPRETER_BF16
    return None


@contextlib.contextmanager
def one_triton_config() -> Iterator[None]:
    """``LORA_ENSEMBLE_TRITON_AUTOTUNE=0`` while inside, unless the caller set the switch."""
    if AUTOTUNE_SWITCH in os.environ:
        yield
        return
    os.environ[AUTOTUNE_SWITCH] = "0"
    try:
        yield
    finally:
        del os.environ[AUTOTUNE_SWITCH]


def check(device: torch.device | str | None = None, backends: list[str] | None = None,
          dtypes: list[torch.dtype] | None = None, cases: tuple[CheckCase, ...] = CHECK_CASES) -> list[CheckRow]:
    """Every backend of ``backends`` (default: all that run on ``device``) against the float64
    reference, for each dtype of ``dtypes`` (default: float32, float16, bfloat16), stacked and shared
    input, and each case; one :class:`CheckRow` per combination. ``device`` defaults to the first
    GPU, else the CPU. A backend that cannot run on ``device`` gives SKIP rows with the reason."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    backends = backends or [name for name in BACKENDS if unavailable_reason(name, device) is None]
    dtypes = dtypes or [torch.float32, torch.float16, torch.bfloat16]
    rows = []
    with one_triton_config():
        for backend in backends:
            for dtype in dtypes:
                bound = error_bound(dtype, device)
                for shared in (False, True):
                    for number, case in enumerate(cases):
                        row = CheckRow(backend, str(device), DTYPE_NAMES[dtype], "shared" if shared else "stacked",
                                       case.label, "SKIP", bound)
                        row.note = unavailable_reason(backend, device) or _skip_reason(backend, device, dtype) or ""
                        if not row.note:
                            try:
                                row.errors = _errors(case, shared, backend, dtype, device, seed=number)
                                row.status = "PASS" if all(e <= bound for e in row.errors.values()) else "FAIL"
                            except Exception as exc:  # noqa: BLE001  (a crash is a result: report it, go on)
                                row.status = "ERROR"
                                row.note = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
                        rows.append(row)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return rows


def format_check(rows: list[CheckRow]) -> str:
    """The check as a table: one line per row, the worst result's error named, then a summary."""
    lines = [f"{'backend':<7} {'dtype':<8} {'layout':<7} {'case':<18} {'out':>8} {'dx':>8} {'dA':>8} {'dB':>8} "
             f"{'dbase':>8} {'bound':>7}  result"]
    for row in rows:
        cells = " ".join(f"{row.errors[name]:>8.1e}" if name in row.errors else f"{'':>8}"
                         for name in ("out", "dx", "dA", "dB", "dbase"))
        lines.append(f"{row.backend:<7} {row.dtype:<8} {row.layout:<7} {row.case:<18} {cells} {row.bound:>7.0e}  "
                     f"{row.status}{'  ' + row.note if row.note else ''}")
    counts = {status: sum(row.status == status for row in rows) for status in ("PASS", "FAIL", "ERROR", "SKIP")}
    lines.append(", ".join(f"{count} {status}" for status, count in counts.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_ensemble.info", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="self-test every available backend against float64")
    parser.add_argument("--device", help="device of the check (default: the first GPU, else the CPU)")
    parser.add_argument("--backend", action="append", choices=BACKENDS, help="repeatable; default: every one that runs")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPE_NAMES.values()),
                        help="repeatable; default: all three")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the report and the check as JSON")
    args = parser.parse_args(argv)
    text = report()
    print(text, flush=True)
    rows: list[CheckRow] = []
    if args.check:
        dtypes = [next(d for d, n in DTYPE_NAMES.items() if n == name) for name in args.dtype or []]
        start = time.perf_counter()
        rows = check(args.device, args.backend, dtypes or None)
        tuning = "autotuned" if os.environ.get(AUTOTUNE_SWITCH, "0") != "0" else "one config per kernel"
        print(f"\ncheck against float64 in {time.perf_counter() - start:.1f} s (error: max |got - want| / "
              f"(RMS(want) + |want|); Triton: {tuning})")
        print(format_check(rows), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"report": text.splitlines(), "check": [asdict(row) for row in rows]},
                                        indent=1))
    return 1 if any(row.status in ("FAIL", "ERROR") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
