"""lora_ensemble: fused LoRA-Ensemble linear layers (Triton, CUDA C++ and PyTorch backends).

Importing the package touches neither CUDA, Triton nor the compiled extension; backends load
on first use.
"""

from . import (
    flop_counts,  # noqa: F401  (FLOP formulas of the ops for FlopCounterMode)
    metrics,
)
from .backends import available_backends
from .compile_ahead import compiling_ahead
from .ensemble import EnsembleHead, EnsemblePrediction, LoRAEnsemble, PerMemberModule
from .functional import fused_lora_ensemble_linear, lora_ensemble_delta
from .layout import replicate_members, to_member_fastest, to_member_major
from .modules import FusedLoRAEnsembleLinear, LoRAEnsembleLayer, LoRAEnsembleOverBase
from .parallel import MemberParallelEnsemble
from .reference import lora_ensemble_reference, lora_ensemble_reference_backward

__version__ = "0.1.0"

__all__ = [
    "EnsembleHead",
    "EnsemblePrediction",
    "FusedLoRAEnsembleLinear",
    "LoRAEnsembleLayer",
    "LoRAEnsembleOverBase",
    "LoRAEnsemble",
    "MemberParallelEnsemble",
    "PerMemberModule",
    "available_backends",
    "compiling_ahead",
    "fused_lora_ensemble_linear",
    "lora_ensemble_delta",
    "lora_ensemble_reference",
    "lora_ensemble_reference_backward",
    "metrics",
    "replicate_members",
    "to_member_fastest",
    "to_member_major",
]
