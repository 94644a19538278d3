"""Compile a model's Triton kernels together, before its first fused call.

A Triton launch key's first call compiles the cost model's best few configs (on threads, together)
and times them, then the next key's first call does the same: a forward with two keys (ViT-B: the
fused qkv and the output projection) waits for two rounds of compiles, a training step for six, one
after another. Inside ``compiling_ahead()`` nothing is launched: every Triton launch whose key is new
submits its configs' compiles to one thread pool (Triton's asynchronous compile mode) and the call is
computed by the composite (the ``torch`` backend) instead, so the block runs the model once, exactly,
and the compiles of all its keys overlap; leaving the block waits for them. The next call of each key
then only times the configs (already in Triton's cache) and binds the fastest::

    with lora_ensemble.compiling_ahead() as ahead:
        model(example)              # or a whole training step: forward, loss, backward
    print(ahead.summary())
    model(batch)                    # times the compiled configs of each key, then runs fused

What a key compiles ahead is what its first call would: the stored winner or, with tuning pinned
(``LORA_ENSEMBLE_TRITON_AUTOTUNE=0`` or deterministic algorithms), the model's first config, one
compile; else the model's best ``MAX_TIMED_CONFIGS``. ``backend="auto"`` makes no choice inside the
block: a shape class not yet decided submits its Triton compiles, and is decided (measured) at its
first call after it. The block covers the calls made on its own thread (a context variable). Nothing
here changes what a call computes: inside the block every call's result is the composite's. So no
CUDA graph may be captured inside it (``torch.compile(mode="reduce-overhead")`` records on a later
call): the graph would replay the composite for good; a fused call during a capture there is an error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

__all__ = ["AheadCompiles", "ahead_compiles", "async_compile_mode", "compiling_ahead", "composite_computes", "logger"]

# The Triton launchers' log (kernels/launcher.py): each config choice, and each block's summary.
logger = logging.getLogger("lora_ensemble.triton")

# The most compile threads of one block (each compile runs ptxas in a process of its own).
_MAX_WORKERS = 32


@dataclass
class AheadCompiles:
    """What one :func:`compiling_ahead` block submitted.

    Attributes:
        keys: ``(kernel, tuning key, configs submitted)`` per launch key met in the block, in order
            (a compile that two launch keys share, by Triton's cache key, runs once).
        wait_s: the seconds that leaving the block waited for the compiles still running.
        workers: the compile threads (0 where this Triton compiles only one after another).
    """

    keys: list[tuple[str, str, int]] = field(default_factory=list)
    wait_s: float = 0.0
    workers: int = 0
    _seen: set = field(default_factory=set, repr=False)

    def first_sight(self, kernel: str, launch_key: tuple) -> bool:
        """Whether ``launch_key`` of ``kernel`` is new to this block (and mark it seen)."""
        seen = (kernel, launch_key) in self._seen
        self._seen.add((kernel, launch_key))
        return not seen

    def summary(self) -> str:
        """One line: launch keys, the tuning keys they belong to, configs submitted, the wait at the end."""
        tuning_keys = {(kernel, key) for kernel, key, _ in self.keys}
        threads = f"{self.workers} threads" if self.workers else "one after another"
        return (f"compiled ahead: {len(self.keys)} launch keys of {len(tuning_keys)} tuning keys, "
                f"{sum(count for _, _, count in self.keys)} configs submitted ({threads}; a compile launch keys "
                f"share runs once); the block's end waited {self.wait_s:.2f} s")


_ACTIVE: ContextVar[AheadCompiles | None] = ContextVar("lora_ensemble_compiling_ahead", default=None)


def ahead_compiles() -> AheadCompiles | None:
    """The :class:`AheadCompiles` of the block this thread is in, or None outside one."""
    return _ACTIVE.get()


def composite_computes() -> bool:
    """Whether this thread is inside a :func:`compiling_ahead` block, where the composite computes the
    fused backends' calls.

    Raises:
        RuntimeError: inside a block while a CUDA graph is being captured (it would replay the composite).
    """
    if _ACTIVE.get() is None:
        return False
    if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("a CUDA graph is being captured inside lora_ensemble.compiling_ahead(), where the "
                           "composite computes the fused calls: the graph would replay it for good. Capture after "
                           "the block (torch.compile's reduce-overhead mode records on a later call than the first)")
    return True


def async_compile_mode(workers: int) -> tuple[contextlib.ExitStack | None, int]:
    """Triton's asynchronous compile mode entered on a pool of ``workers`` threads (closing the stack
    waits for every compile, then shuts the pool down), with the pool's count; (None, 0) where the
    installed Triton has none (its compiles then run at each submission, one by one)."""
    try:
        from concurrent.futures import ThreadPoolExecutor

        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return None, 0
    stack = contextlib.ExitStack()
    try:
        pool = stack.enter_context(ThreadPoolExecutor(workers, thread_name_prefix="lora_ensemble_compile"))
        # A config that fails to compile is left out here; its error comes back if it is run.
        stack.enter_context(AsyncCompileMode(pool, ignore_errors=True))
    except BaseException:
        stack.close()
        raise
    return stack, workers


@contextlib.contextmanager
def compiling_ahead(workers: int | None = None) -> Iterator[AheadCompiles]:
    """Inside the block, Triton launches compile their new keys' configs together and the composite
    computes every fused call; leaving it waits for the compiles (see the module docstring).

    Args:
        workers: compile threads; default: the CPU count (at most 32).

    Yields:
        the :class:`AheadCompiles` that records what was submitted, and the wait at the end.

    Raises:
        RuntimeError: blocks nested on one thread (or inside another asynchronous compile mode of Triton's).
        ValueError: ``workers`` below 1.
    """
    if _ACTIVE.get() is not None:
        raise RuntimeError("compiling_ahead() blocks do not nest: leave the outer one first")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    mode, count = async_compile_mode(workers or min(os.cpu_count() or 1, _MAX_WORKERS))
    ahead = AheadCompiles(workers=count)
    token = _ACTIVE.set(ahead)
    try:
        yield ahead
    finally:
        _ACTIVE.reset(token)
        start = time.perf_counter()
        if mode is not None:
            mode.close()
        ahead.wait_s = time.perf_counter() - start
        logger.debug("%s", ahead.summary())
