"""``backend="auto"`` on CUDA tensors: per shape class, the fastest backend available, the composite
(``torch``) included, so the fused kernels run where they win and the composite where they do not.

A shape class (:class:`lora_ensemble.auto_costs.ShapeClass`) is the op, dtype, members, rows per
member rounded up to a power of two, ``d``, ``k``, rank, shared or stacked input, and whether gradients
are recorded. On the first call of a class, in this order:

1. **stored**: the choice measured earlier on this machine (same GPU model, torch and triton), from
   the tuning file (:mod:`lora_ensemble.tuning_store`);
2. **measured**: each candidate runs the call's own inputs (forward, and with gradients its two
   backward steps) after a warm-up that compiles and autotunes; the one with the shortest wall time
   per call (host and device: what an eager caller waits for) wins and is stored;
3. **model**: the cost model's estimate (:mod:`lora_ensemble.auto_costs`), where measuring is not
   possible or not wanted: while ``torch.compile`` traces (device time, no host cost: a compiled
   graph has none), during CUDA-graph capture, with ``LORA_ENSEMBLE_AUTO_MEASURE=0``, and whenever
   tuning is pinned (``LORA_ENSEMBLE_TRITON_AUTOTUNE=0`` or ``torch.use_deterministic_algorithms(True)``:
   then stored choices are not read either, so the choice is a function of the shape and the GPU
   alone and repeated runs compute the same bits).

Inside :func:`lora_ensemble.compiling_ahead` a class not yet decided is not decided: its calls go to
``triton`` (when a candidate), whose kernels compile ahead while the composite computes them, and the
first call after the block decides as above.

Every later call of the class is one dictionary lookup. What was chosen and why is logged once per
class (logger ``lora_ensemble.auto``, level DEBUG) and listed by :func:`auto_decisions` /
:func:`format_auto_decisions` (``python -m lora_ensemble.info``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .auto_costs import ShapeClass, estimate_backend, rows_bucket
from .backends import auto_candidates, get_backend
from .compile_ahead import ahead_compiles
from .tuning_store import PIN_VARIABLE, tuning_pinned, tuning_store

__all__ = [
    "MEASURE_VARIABLE",
    "PIN_VARIABLE",
    "AutoDecision",
    "auto_backend",
    "auto_decisions",
    "decide",
    "format_auto_decisions",
    "shape_class",
    "tuning_pinned",
]

logger = logging.getLogger("lora_ensemble.auto")

MEASURE_VARIABLE = "LORA_ENSEMBLE_AUTO_MEASURE"
_WARMUP_CALLS = 2
_TIMED_ROUNDS = 5
_CALLS_PER_ROUND = 10
_MAX_CHOICES = 4096  # exact call shapes remembered before the per-call table starts over


@dataclass(frozen=True)
class AutoDecision:
    """What ``auto`` runs for one shape class on one device, and why.

    ``source`` is ``"stored"``, ``"measured"``, ``"model"`` or ``"only candidate"``; ``times_us`` the
    measured (or, for the model, estimated) µs per call of each candidate; ``notes`` what else
    mattered (a candidate that failed, why nothing was measured)."""

    device: str
    shape: ShapeClass
    backend: str
    source: str
    times_us: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def why(self) -> str:
        """One line: the source and the time of every candidate."""
        times = ", ".join(f"{name} {us:.1f} µs" for name, us in sorted(self.times_us.items(), key=lambda kv: kv[1]))
        text = {"measured": "measured here", "stored": "measured earlier on this machine",
                "model": "modelled"}.get(self.source, self.source)
        return text + (f": {times}" if times else "") + "".join(f"; {note}" for note in self.notes)


# (device, dtype, op, members, rows, d, k, rank, shared, grad) of a call -> backend: the per-call lookup.
_CHOICES: dict[tuple, str] = {}
# (device, shape class) -> the decision, once per class and process.
_DECISIONS: dict[tuple[torch.device, ShapeClass], AutoDecision] = {}


def shape_class(op: str, dtype: torch.dtype, members: int, rows: int, d: int, k: int, rank: int, shared: bool,
                grad: bool) -> ShapeClass:
    """The class of a call with ``rows`` rows per member."""
    return ShapeClass(op, dtype, members, rows_bucket(rows), d, k, rank, shared, grad)


def _modelled(device: torch.device, shape: ShapeClass, candidates: tuple[str, ...], compiled: bool,
              notes: tuple[str, ...]) -> AutoDecision:
    from .kernels.gpu_specs import gpu_spec

    gpu = gpu_spec(device)
    estimates = {name: estimate_backend(name, shape, gpu) for name in candidates}
    seconds = {name: (est.device_s if compiled else est.eager_s) for name, est in estimates.items()}
    best = min(candidates, key=lambda name: (seconds[name], candidates.index(name)))
    basis = "device time (a compiled graph has no per-call host cost)" if compiled else "max(host, device)"
    return AutoDecision(str(device), shape, best, "model", {n: s * 1e6 for n, s in seconds.items()},
                        (f"{gpu.name}, {basis}", *notes))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(device: torch.device, steps: dict[str, Callable[[], object]]) -> tuple[dict[str, float], list[str]]:
    """µs per call of each step (min over interleaved rounds of back-to-back calls, synchronised
    around each round), after a warm-up; a step that raises is left out and named."""
    failures, working = [], {}
    for name, step in steps.items():
        try:
            for _ in range(_WARMUP_CALLS):
                step()
            _synchronize(device)
            working[name] = step
        except Exception as exc:  # noqa: BLE001  (a candidate that cannot run here is not chosen)
            failures.append(f"{name} failed: {type(exc).__name__}: {str(exc).strip()[:200]}")
    best = {name: float("inf") for name in working}
    for _ in range(_TIMED_ROUNDS):
        for name, step in working.items():
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(_CALLS_PER_ROUND):
                step()
            _synchronize(device)
            best[name] = min(best[name], (time.perf_counter() - start) / _CALLS_PER_ROUND * 1e6)
    return best, failures


def decide(device: torch.device, shape: ShapeClass, candidates: tuple[str, ...],
           steps: Callable[[], dict[str, Callable[[], object]]] | None = None, compiled: bool = False) -> AutoDecision:
    """``auto``'s decision for ``shape`` on ``device`` among ``candidates`` (see the module docstring
    for the order of sources). ``steps`` builds one zero-argument call per candidate for measuring;
    None (or ``compiled``) decides without measuring."""
    if len(candidates) == 1:
        return AutoDecision(str(device), shape, candidates[0], "only candidate")
    if compiled:
        return _modelled(device, shape, candidates, True, ("while torch.compile traces",))
    if tuning_pinned():
        return _modelled(device, shape, candidates, False, ("tuning pinned: nothing measured or read",))
    store = tuning_store(device)
    stored = store.auto_choice(shape.key())
    if stored is not None and stored.get("backend") in candidates:
        return AutoDecision(str(device), shape, stored["backend"], "stored", dict(stored.get("times_us", {})),
                            (f"from {store.path}",))
    why_not = None
    if steps is None:
        why_not = "no inputs to measure with"
    elif os.environ.get(MEASURE_VARIABLE, "1") == "0":
        why_not = f"{MEASURE_VARIABLE}=0"
    elif device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        why_not = "during CUDA-graph capture"
    if why_not is not None:
        return _modelled(device, shape, candidates, False, (why_not,))
    times, failures = _measure(device, steps())
    if not times:
        return _modelled(device, shape, candidates, False, tuple(failures))
    best = min(times, key=lambda name: (times[name], candidates.index(name)))
    store.record_auto_choice(shape.key(), best, times)
    return AutoDecision(str(device), shape, best, "measured", times, tuple(failures))


def _record(device: torch.device, decision: AutoDecision) -> AutoDecision:
    _DECISIONS[(device, decision.shape)] = decision
    logger.debug("auto on %s: %s -> %s (%s)", device, decision.shape.key(), decision.backend, decision.why())
    return decision


def _measuring_steps(x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                     scaling: float, shared_input: bool, base: Tensor | None, grad: bool,
                     candidates: tuple[str, ...]) -> dict[str, Callable[[], object]]:
    """One call of the op per candidate on these inputs: the backend's forward and, with gradients,
    its dx and weight-gradient steps (``grad_out`` = the output), outside autograd."""
    x, base = x.contiguous(), base.contiguous() if base is not None else None
    bias, scaling = bias.contiguous() if bias is not None else None, float(scaling)

    def step_of(name: str) -> Callable[[], object]:
        impl = get_backend(name)
        w = weight.contiguous() if name == "cuda" and weight is not None else weight

        def step() -> object:
            with torch.no_grad():
                out, xa = impl.forward(x, w, bias, lora_A, lora_B, scaling, shared_input, base=base)
                if grad:
                    _, dyb = impl.backward_dx(out, w, lora_A, lora_B, scaling, shared_input)
                    impl.backward_lora(out, x, xa, dyb, scaling, shared_input)
            return out

        return step

    return {name: step_of(name) for name in candidates}


@torch.compiler.assume_constant_result
def _compiled_choice(device: torch.device, dtype: torch.dtype, op: str, members: int, rows: int, d: int, k: int,
                     rank: int, shared: bool, grad: bool) -> str:
    # Folded to a constant while torch.compile traces (rows is -1 when symbolic: the composite).
    candidates = auto_candidates(device, dtype)
    if rows < 0:
        return "torch" if "torch" in candidates else candidates[0]
    shape = shape_class(op, dtype, members, rows, d, k, rank, shared, grad)
    return _record(device, decide(device, shape, candidates, compiled=True)).backend


def auto_backend(x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                 scaling: float, shared_input: bool, base: Tensor | None = None) -> str:
    """The backend ``auto`` runs this call on: ``x [N, M, d]`` (``[M, d]`` shared), ``weight [k, d]``
    (None for the delta op over ``base``), ``lora_A [N, r, d]``, ``lora_B [N, k, r]``, all laid out
    as the op takes them. A dictionary lookup after a shape's first call."""
    members, rank, d = lora_A.shape
    k = lora_B.shape[1]
    rows = x.shape[0] if shared_input else x.shape[1]
    grad = torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad
                                        or (base is not None and base.requires_grad))
    op = "linear" if weight is not None else "delta"
    if torch.compiler.is_compiling():
        return _compiled_choice(x.device, x.dtype, op, members, rows if isinstance(rows, int) else -1, d, k, rank,
                                shared_input, grad)
    key = (x.device, x.dtype, op, members, rows, d, k, rank, shared_input, grad)
    name = _CHOICES.get(key)
    if name is not None:
        return name
    shape = shape_class(op, x.dtype, members, rows, d, k, rank, shared_input, grad)
    decision = _DECISIONS.get((x.device, shape))
    if decision is None:
        candidates = auto_candidates(x.device, x.dtype)
        if "triton" in candidates and ahead_compiles() is not None:
            return "triton"  # its kernels compile now (the composite computes the call); decided after the block
        decision = _record(x.device, decide(
            x.device, shape, candidates,
            lambda: _measuring_steps(x, weight, bias, lora_A, lora_B, scaling, shared_input, base, grad, candidates)))
    if len(_CHOICES) >= _MAX_CHOICES:
        _CHOICES.clear()
    _CHOICES[key] = decision.backend
    return decision.backend


def auto_decisions() -> list[AutoDecision]:
    """Every decision ``auto`` made in this process, in order."""
    return list(_DECISIONS.values())


def format_auto_decisions() -> list[str]:
    """One line per decision of this process (for ``python -m lora_ensemble.info``)."""
    if not _DECISIONS:
        return ["no per-shape choice made yet in this process (CUDA tensors decide on a shape's first call)"]
    return [f"{d.device:<7} {d.shape.key():<58} {d.backend:<7} {d.why()}" for d in _DECISIONS.values()]
