# What the launchers need to know about the GPU they launch on: the device to make current (Triton
# launches on the current device and its current stream, not on the tensors' device), its compute
# capability, shared memory per program and SM count (cached per device), and the grid limit of
# axes 1 and 2.
"""Device facts and the device guard used by the Triton launchers."""

from __future__ import annotations

import contextlib
import functools

import torch

__all__ = [
    "MAX_GRID_YZ",
    "check_grid_yz",
    "compute_capability",
    "launch_device",
    "multiprocessor_count",
    "shared_memory_per_program",
]

# CUDA's limit on grid.y and grid.z (grid.x allows 2^31 - 1).
MAX_GRID_YZ = 65535

_NO_GUARD = contextlib.nullcontext()


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that makes the CUDA ``device`` of a launch's tensors current for a Triton launch (a
    no-op when it already is, or for CPU tensors under the interpreter). Triton takes the device, its
    stream and the tuning's benchmark device from the current device, so a model on ``cuda:1`` with
    ``cuda:0`` current would otherwise run its kernels on GPU 0 with GPU 1 pointers."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(device)


@functools.cache
def _properties_of(index: int):
    return torch.cuda.get_device_properties(index)


def _properties(device: torch.device):
    return _properties_of(device.index if device.index is not None else torch.cuda.current_device())


def compute_capability(device: torch.device) -> int:
    """``10 * major + minor`` of a CUDA ``device`` (90 for Hopper); 90 for the CPU interpreter."""
    if device.type != "cuda":
        return 90
    props = _properties(device)
    return 10 * props.major + props.minor


def shared_memory_per_program(device: torch.device) -> int:
    """Shared memory one program may use on a CUDA ``device`` (bytes, the opt-in maximum); the
    Hopper amount for the CPU interpreter."""
    if device.type != "cuda":
        return 232448
    props = _properties(device)
    return getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block)


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device``."""
    return _properties(device).multi_processor_count


def check_grid_yz(what: str, size: int, detail: str) -> None:
    """Raise a ValueError naming ``what`` when ``size`` programs do not fit on grid axis 1 or 2."""
    if size > MAX_GRID_YZ:
        raise ValueError(f"{what}={size} exceeds {MAX_GRID_YZ}, the CUDA grid limit of the axis it is launched on "
                         f"({detail})")
