"""Triton kernels of lora_ensemble and their plain launchers (no autograd), shipped as
``lora_ensemble.kernels``. Importing this package needs Triton, not a GPU.

The files match their CUDA C++ counterparts in ``csrc/cuda/`` and use the same words for the same
roles (``in``, ``weight``, ``shrink``, ``expand``, ``low``; see ``csrc/cuda/params.cuh``):
``fused_lora_gemm.py`` (forward and dx backward: ``launch_fused_lora_gemm``), ``lora_grads.py`` (dA
and dB: ``launch_lora_grads``), named like the CUDA host launchers, with ``dot.py``
(fp32 x 16-bit dots), ``configs.py`` (autotune lists, pruning), ``device.py`` (device guard and
limits) and ``aot.py`` (compile every kernel for sm_80 / sm_90 without a GPU).
"""

from .fused_lora_gemm import launch_fused_lora_gemm
from .lora_grads import launch_lora_grads

__all__ = ["launch_fused_lora_gemm", "launch_lora_grads"]
