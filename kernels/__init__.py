"""Triton kernels of lora_ensemble and their plain launchers (no autograd), shipped as
``lora_ensemble.kernels``. Importing this package needs Triton, not a GPU."""

from .lowrank_matmul import fused_lowrank_matmul
from .weight_grads import lowrank_weight_grads

__all__ = ["fused_lowrank_matmul", "lowrank_weight_grads"]
