# How the package's Triton kernels are launched: a config chosen once per tuning key, and the
# compiled kernel bound once per launch key and called directly on every later launch.
#
# Tuning key (what the best config depends on: the kernel's variant, dtype and dot precision, the
# launch policy's tiles, the widths, the row and member counts' power-of-two buckets, the argument
# specialisation; one table per GPU model): on its first launch the configs the pruning keeps
# (kernels/configs.py) are ranked by the cost model (kernels/config_model.py, the launch as
# kernels/launch_costs.py describes it), and
#   - tuning pinned (LORA_ENSEMBLE_TRITON_AUTOTUNE=0, or torch.use_deterministic_algorithms(True)):
#     the model's first; nothing is compiled for nothing, timed or read;
#   - a winner stored for this GPU model, torch and triton (lora_ensemble/tuning_store.py, the
#     folder LORA_ENSEMBLE_CACHE_DIR): that one, untimed;
#   - else the model's best MAX_TIMED_CONFIGS are compiled (together, on threads, where Triton can
#     compile asynchronously), each timed on the call's own arguments, and the fastest is stored.
# Launch key (everything a compiled kernel is specialised on: the exact integer arguments, the dtype,
# whether every pointer is 16-byte aligned, the device, the pin): its first launch goes through
# Triton's JIT with the chosen config (a compile, or Triton's own disk cache), which returns the
# compiled kernel; it is kept with its grid and its constexpr arguments, and every later launch of the
# key is one dictionary lookup and the compiled kernel's launcher on the current stream: no binder,
# no autotuner, no per-call config filtering or argument dictionaries.
# Under TRITON_INTERPRET=1 there is no compiled kernel: each launch runs the interpreter.
# Each choice is logged once (logger lora_ensemble.triton, level DEBUG): the key, the config, how it was
# chosen and, when timed, every candidate's µs and the seconds its compiles and timings took.
# Inside lora_ensemble.compiling_ahead() (lora_ensemble/compile_ahead.py) nothing is launched, a key
# bound before the block included: a launch key's first launch there submits the compiles its choice
# will need (the untimed choice's config, else the best MAX_TIMED_CONFIGS) to the block's thread pool,
# so that a whole model's keys compile together.
"""Launch the package's Triton kernels: one config per tuning key, the compiled kernel bound per launch key."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
from triton import knobs

from lora_ensemble.backends import triton_interpreting
from lora_ensemble.compile_ahead import AheadCompiles, ahead_compiles, async_compile_mode, logger
from lora_ensemble.triton_hash import wait_for_hash

from .config_model import GemmLaunch, best_configs

__all__ = ["MAX_BOUND_KEYS", "MAX_TIMED_CONFIGS", "LaunchPlan", "TunedKernel"]

# The most candidates compiled and timed for one tuning key (the cost model picks them).
MAX_TIMED_CONFIGS = 3
# Timing of one candidate (triton.testing.do_bench, ms): short, as each new key waits for it.
_BENCH_WARMUP_MS, _BENCH_REP_MS = 5, 25
# Launch keys kept per kernel before the table starts over (every distinct row count is a key).
MAX_BOUND_KEYS = 4096


@dataclass(frozen=True)
class LaunchPlan:
    """What the first launch of a launch key needs beyond the arguments.

    Attributes:
        tuning_key: the text key of the config winner (the tuning file's and this process's).
        candidates: the configs the pruning keeps for it, in list order.
        cost: the launch as the config model sees it (kernels/launch_costs.py).
        grid: the grid of a config.
        constexprs: the kernel's constexpr arguments that the config does not set (flags, tiles).
        gpu: the GPU the cost model ranks for (:class:`~.gpu_specs.GpuSpec`).
        reset: zeroes the outputs before each timed run (a reduction that adds into them), or None.
    """

    tuning_key: str
    candidates: list[triton.Config]
    cost: GemmLaunch
    grid: Callable[[triton.Config], tuple[int, ...]]
    constexprs: dict[str, Any]
    gpu: Any
    reset: Callable[[], None] | None = None


@dataclass
class _Tuning:
    """What chose a tuning key's config: the source and, when timed, the µs of each candidate."""

    config: triton.Config
    source: str
    timings_us: dict[str, float] = field(default_factory=dict)


def _memo(plan: LaunchPlan, device: torch.device, pinned: bool) -> tuple:
    """Where :attr:`TunedKernel.tunings` keeps a tuning key's choice."""
    return str(device), plan.tuning_key, pinned


def _config_name(config: triton.Config) -> str:
    tiles = " ".join(f"{k}={v}" for k, v in sorted(config.kwargs.items()))
    return f"{tiles} w{config.num_warps} s{config.num_stages}"


def _same_config(config: triton.Config, stored: dict) -> bool:
    return (config.kwargs == stored.get("kwargs") and config.num_warps == stored.get("num_warps")
            and config.num_stages == stored.get("num_stages"))


class _CompiledLaunch:
    """A compiled kernel bound to its grid and constexpr arguments: ``launch(args)`` runs it on the
    current stream of ``device`` with ``args`` (the kernel's runtime arguments, in its order), as
    Triton's JIT launch does after its binder and cache lookup."""

    __slots__ = ("kernel", "run", "function", "metadata", "grid", "tail", "device", "stream")

    def __init__(self, kernel: Any, grid: tuple[int, ...], tail: tuple, device: int) -> None:
        self.kernel, self.run, self.function = kernel, kernel.run, kernel.function
        self.metadata = kernel.packed_metadata
        self.grid = (*grid, 1, 1)[:3]
        self.tail, self.device = tail, device
        self.stream = triton.runtime.driver.active.get_current_stream

    def __call__(self, args: tuple) -> None:
        stream, grid = self.stream(self.device), self.grid
        enter = knobs.runtime.launch_enter_hook
        if enter is None or not getattr(enter, "calls", True):
            # No launch hooks (triton 3.8 keeps an empty HookChain): no launch metadata to build, and None
            # spares the driver's launcher a call of each empty chain.
            self.run(grid[0], grid[1], grid[2], stream, self.function, self.metadata, None, None, None, *args,
                     *self.tail)
            return
        # A profiler's (proton's) hooks see the launch as they would Triton's own.
        self.run(grid[0], grid[1], grid[2], stream, self.function, self.metadata,
                 self.kernel.launch_metadata(grid, stream, *args, *self.tail), enter, knobs.runtime.launch_exit_hook,
                 *args, *self.tail)


class _InterpretedLaunch:
    """The interpreter's launch of a kernel with a config (``TRITON_INTERPRET=1``: no compiled kernel)."""

    __slots__ = ("fn", "grid", "kwargs")

    def __init__(self, fn: Any, grid: tuple[int, ...], kwargs: dict[str, Any]) -> None:
        self.fn, self.grid, self.kwargs = fn, grid, kwargs

    def __call__(self, args: tuple) -> None:
        self.fn[self.grid](*args, **self.kwargs)


class TunedKernel:
    """One Triton kernel (``fn``, a ``triton.jit`` function launched by its runtime arguments in
    order, then its constexprs by name) with its tuned configs and bound launches.

    ``bound`` maps a launch key to a launch (``bound[key](args)``); a launcher asks :meth:`bound_launch`
    for its key and calls :meth:`bind` only on a miss."""

    def __init__(self, name: str, fn: Any) -> None:
        self.name, self.fn = name, fn
        self.bound: dict[tuple, Callable[[tuple], None]] = {}
        self.tunings: dict[tuple, _Tuning] = {}

    def bound_launch(self, key: tuple) -> Callable[[tuple], None] | None:
        """The launch bound to ``key``, or None: not bound yet, or inside a
        :func:`~lora_ensemble.compile_ahead.compiling_ahead` block, which launches nothing (:meth:`bind`
        submits the key's compiles there)."""
        return self.bound.get(key) if ahead_compiles() is None else None

    def bind(self, key: tuple, args: tuple, plan: LaunchPlan, device: torch.device, pinned: bool) -> None:
        """Choose the config of ``plan``'s tuning key (once per key and device), launch ``args`` with it
        through Triton's JIT and keep the compiled kernel under ``key`` for the next launches. Inside
        :func:`~lora_ensemble.compile_ahead.compiling_ahead`: submit the compiles of the configs the
        choice needs instead, and launch nothing."""
        wait_for_hash()  # Triton's key, if a thread is hashing it (lora_ensemble/triton_hash.py)
        ahead = ahead_compiles()
        if ahead is not None:
            self._compile_ahead(ahead, key, args, plan, device, pinned)
            return
        tuning = self.tuning(plan, args, device, pinned)
        config = tuning.config
        grid = plan.grid(config)
        constexprs = {**plan.constexprs, **config.all_kwargs()}
        if plan.reset is not None:
            plan.reset()
        kernel = self.fn[grid](*args, **constexprs)
        if len(self.bound) >= MAX_BOUND_KEYS:
            self.bound.clear()
        if hasattr(kernel, "packed_metadata"):
            names = self.fn.arg_names[len(args):]
            values = {**plan.constexprs, **config.kwargs}
            index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
            self.bound[key] = _CompiledLaunch(kernel, grid, tuple(values[name] for name in names),
                                              -1 if index is None else index)
        else:  # the interpreter returns no kernel
            self.bound[key] = _InterpretedLaunch(self.fn, grid, constexprs)

    def tuning(self, plan: LaunchPlan, args: tuple, device: torch.device, pinned: bool) -> _Tuning:
        """The config of ``plan.tuning_key`` on ``device`` and how it was chosen (see the module header)."""
        tuning, ranked = self._known_tuning(plan, device, pinned)
        if tuning is None:
            from lora_ensemble.tuning_store import tuning_store

            start = time.perf_counter()
            timings = self._time(ranked, args, plan)
            best = min(ranked, key=lambda c: timings[_config_name(c)])
            tuning_store(device).record_triton_config(self.name, plan.tuning_key, best.kwargs, best.num_warps,
                                                      best.num_stages, timings)
            tuning = self.tunings[_memo(plan, device, pinned)] = _Tuning(best, "timed", timings)
            times = ", ".join(f"{name} {us:.1f} µs" for name, us in sorted(timings.items(), key=lambda kv: kv[1]))
            logger.debug("%s on %s, %s: %s (timed: %s; compiled and timed in %.2f s)", self.name, device,
                         plan.tuning_key, _config_name(best), times, time.perf_counter() - start)
        return tuning

    def _known_tuning(self, plan: LaunchPlan, device: torch.device,
                      pinned: bool) -> tuple[_Tuning | None, list[triton.Config]]:
        """The tuning key's config where it is known without timing (chosen before in this process,
        pinned, a single candidate, a stored winner: kept for the next asks), else None with the model's
        best ``MAX_TIMED_CONFIGS`` candidates to time."""
        memo = _memo(plan, device, pinned)
        tuning = self.tunings.get(memo)
        if tuning is not None:
            return tuning, []
        ranked = best_configs(plan.candidates, plan.cost, plan.gpu, keep=MAX_TIMED_CONFIGS)
        if pinned or len(ranked) == 1:
            tuning = _Tuning(ranked[0], "pinned: the model's first" if pinned else "the only candidate")
        else:
            from lora_ensemble.tuning_store import tuning_store

            stored = tuning_store(device).triton_config(self.name, plan.tuning_key)
            match = next((c for c in plan.candidates if stored is not None and _same_config(c, stored)), None)
            if match is None:
                return None, ranked
            tuning = _Tuning(match, "stored", dict(stored.get("timings_us", {})))
        self.tunings[memo] = tuning
        logger.debug("%s on %s, %s: %s (%s)", self.name, device, plan.tuning_key, _config_name(tuning.config),
                     tuning.source)
        return tuning, []

    def _compile_ahead(self, ahead: AheadCompiles, key: tuple, args: tuple, plan: LaunchPlan, device: torch.device,
                       pinned: bool) -> None:
        """Submit the compiles a launch key's first call would make: the known choice's config, else
        the configs it would time (once per launch key and block; none under the interpreter)."""
        if not ahead.first_sight(self.name, key):
            return
        tuning, ranked = self._known_tuning(plan, device, pinned)
        configs = [tuning.config] if tuning is not None else ranked
        ahead.keys.append((self.name, plan.tuning_key, len(configs)))
        if not triton_interpreting():
            self._warmup(configs, args, plan)

    def _warmup(self, configs: list[triton.Config], args: tuple, plan: LaunchPlan) -> None:
        """Compile ``configs`` for ``args`` without launching (submitted, where an asynchronous compile
        mode of Triton's is active). A config that fails to compile fails again, with its error, when
        it is run."""
        for config in configs:
            with contextlib.suppress(Exception):
                self.fn.warmup(*args, grid=plan.grid(config), **plan.constexprs, **config.all_kwargs())

    def _compile(self, configs: list[triton.Config], args: tuple, plan: LaunchPlan) -> None:
        """Compile ``configs`` for ``args`` ahead of their timing: together on threads where Triton
        compiles asynchronously (its ``AsyncCompileMode``), else one after another at the first run."""
        mode, _ = async_compile_mode(len(configs))
        if mode is not None:
            with mode:
                self._warmup(configs, args, plan)

    def _time(self, configs: list[triton.Config], args: tuple, plan: LaunchPlan) -> dict[str, float]:
        """µs per launch of each config on ``args`` (``triton.testing.do_bench``, L2 cleared before
        each run; inf for a config that fails to compile or run, unless all do: then the first
        failure is raised)."""
        self._compile(configs, args, plan)
        timings, failures = {}, []
        for config in configs:
            grid, constexprs = plan.grid(config), {**plan.constexprs, **config.all_kwargs()}

            def run(grid=grid, constexprs=constexprs) -> None:
                if plan.reset is not None:
                    plan.reset()
                self.fn[grid](*args, **constexprs)

            try:
                timings[_config_name(config)] = 1e3 * triton.testing.do_bench(
                    run, warmup=_BENCH_WARMUP_MS, rep=_BENCH_REP_MS)
            except Exception as exc:  # noqa: BLE001  (a candidate that cannot run here is not chosen)
                failures.append(exc)
                timings[_config_name(config)] = float("inf")
        if len(failures) == len(configs):
            raise failures[0]
        return timings

