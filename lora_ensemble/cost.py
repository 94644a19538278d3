"""What a call costs: wall time and peak memory, on the CPU or a CUDA device.

:func:`clock` reads the wall clock once a device's queued work is done. :func:`peak_memory`
is the memory a call needs: on CUDA ``torch.cuda.max_memory_allocated`` over the call (everything
allocated on the device, the model's weights included); on the CPU the bytes of the parameters and
buffers of the modules named plus the peak of the tensor bytes alive during the call, tracked op by op
(:class:`TensorBytes`: every storage an op creates is counted until it is freed). The CPU figure is
therefore weights + activations, KV cache and outputs, not the process's resident size (which also
holds Python, libraries and allocator caches).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["TensorBytes", "clock", "module_bytes", "peak_memory"]


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once ``device``'s queued work is done (CUDA: synchronised)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def module_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of the parameters and buffers of ``modules``, each tensor counted once."""
    seen: dict[int, int] = {}
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class TensorBytes(TorchDispatchMode):
    """Within this mode: ``live`` and ``peak`` bytes of the CPU tensor storages that ops created (a
    storage counts from the op that made it until it is freed; views and in-place ops add nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._counted: set[int] = set()

    def _freed(self, pointer: int, size: int) -> None:
        self._counted.discard(pointer)
        self.live -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                pointer, size = storage.data_ptr(), storage.nbytes()
                if size and pointer not in self._counted:
                    self._counted.add(pointer)
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, pointer, size)
        return out


def peak_memory(call: Callable[[], Any], modules: Iterable[nn.Module], device: torch.device) -> int:
    """Peak bytes ``call()`` needs on ``device``: CUDA's allocator peak over the call; on the CPU the
    bytes of ``modules``' parameters and buffers plus the peak of the tensors alive during the call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    with TensorBytes() as tracker:
        call()
    return module_bytes(modules) + tracker.peak
