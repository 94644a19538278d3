"""``FusedLoRAEnsembleLinear``: a drop-in ``nn.Linear`` (or HF ``Conv1D``) replacement holding all N members."""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import fused_lora_ensemble_linear, validate_inputs
from .layout import replicate_members

__all__ = ["FusedLoRAEnsembleLinear", "is_hf_conv1d"]

INITS = ("paper", "peft")


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is HF transformers' ``Conv1D`` (GPT-2's projections: ``x @ W + b``, ``W [in, out]``).

    Looked up in ``sys.modules`` only: a model holding a ``Conv1D`` has imported transformers.
    """
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


class FusedLoRAEnsembleLinear(nn.Module):
    """A frozen linear layer ``W0`` shared by ``num_members`` LoRA members, run in one fused op.

    Input ``[N*Bsz, ..., in_features]`` (member-major stacked batch), or ``[Bsz, ..., in_features]``
    when ``shared_input`` is set (every member sees the same rows); output
    ``[N*Bsz, ..., out_features]``. Member ``n`` computes
    ``x @ W0^T + bias + scaling * (dropout(x) @ lora_A[n]^T) @ lora_B[n]^T`` (peft's LoRA).

    Attributes:
        weight: ``W0``, frozen (``requires_grad=False``): ``[out_features, in_features]``, or with
            ``fan_in_fan_out`` ``[in_features, out_features]`` (HF ``Conv1D``'s layout, peft's name); the
            op then reads ``weight.t()``, a view (the ``torch`` and ``triton`` backends read it as it is;
            the ``cuda`` backend needs a contiguous ``W0`` and copies it on every call).
        bias: ``[out_features]`` or None, frozen.
        lora_A: ``[N, rank, in_features]``; ``init="paper"``: each member Xavier-uniform with gain
            ``init_gain`` (10, as the LoRA-Ensemble paper); ``init="peft"``: each member Kaiming-uniform
            with ``a=sqrt(5)`` (peft's default, bound ``1/sqrt(in_features)``).
        lora_B: ``[N, out_features, rank]``, zeros: every member starts equal to ``W0``.
        scaling: ``alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``) when ``alpha`` is given,
            else 1.0 (the paper's code).
        lora_dropout: dropout probability on the LoRA path's input, in training mode only (peft's
            ``lora_dropout``; every row of the stacked batch, so every member, draws its own mask). While
            it is active the layer runs ``F.linear(x, W0, b)`` plus two batched GEMMs for the delta (the
            ``torch`` backend's cost, not one fused launch: base and delta read different inputs); in
            eval mode, or with ``lora_dropout=0``, the fused op runs.
        shared_input: default layout of ``forward``'s input.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_members: int,
        rank: int,
        alpha: float | None = None,
        bias: bool = True,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        init_gain: float = 10.0,
        shared_input: bool = False,
        init: str = "paper",
        use_rslora: bool = False,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("num_members", num_members), ("rank", rank)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_lora_options(init, alpha, use_rslora, lora_dropout)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.num_members, self.rank = num_members, rank
        self.alpha, self.use_rslora = alpha, use_rslora
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        self.backend = backend
        self.init, self.init_gain = init, init_gain
        self.lora_dropout = float(lora_dropout)
        self.shared_input = shared_input
        self.fan_in_fan_out = fan_in_fan_out
        shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(num_members, rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(num_members, out_features, rank, **factory))
        self._reset_base()
        self.reset_lora_parameters()

    def _reset_base(self) -> None:
        # nn.Linear's own initialisation (on the [out, in] view when stored transposed).
        nn.init.kaiming_uniform_(self.weight.t() if self.fan_in_fan_out else self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def reset_lora_parameters(self) -> None:
        """``lora_B = 0`` and each ``lora_A[n]`` drawn independently: Xavier-uniform with gain
        ``init_gain`` (``init="paper"``) or Kaiming-uniform with ``a=sqrt(5)`` (``init="peft"``)."""
        with torch.no_grad():
            for member in self.lora_A:
                if self.init == "peft":
                    nn.init.kaiming_uniform_(member, a=math.sqrt(5))
                else:
                    nn.init.xavier_uniform_(member, gain=self.init_gain)
            self.lora_B.zero_()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        num_members: int,
        rank: int,
        alpha: float | None = None,
        backend: str = "auto",
        init_gain: float = 10.0,
        shared_input: bool = False,
        init: str = "paper",
        use_rslora: bool = False,
        lora_dropout: float = 0.0,
    ) -> FusedLoRAEnsembleLinear:
        """Wrap an existing ``nn.Linear`` or HF ``Conv1D`` (then ``fan_in_fan_out=True``): its
        ``weight`` and ``bias`` Parameters are shared, not copied, and frozen
        (``requires_grad_(False)``); the LoRA factors are freshly initialised."""
        conv1d = is_hf_conv1d(linear)
        if not isinstance(linear, nn.Linear) and not conv1d:
            raise TypeError(f"linear must be an nn.Linear or transformers' Conv1D, got {type(linear).__name__}")
        w = linear.weight
        in_features, out_features = w.shape if conv1d else (linear.in_features, linear.out_features)
        layer = cls(in_features, out_features, num_members, rank, alpha=alpha,
                    bias=linear.bias is not None, backend=backend, device="meta", dtype=w.dtype,
                    init_gain=init_gain, shared_input=shared_input, init=init, use_rslora=use_rslora,
                    lora_dropout=lora_dropout, fan_in_fan_out=conv1d)
        layer.weight = w.requires_grad_(False)
        layer.bias = linear.bias.requires_grad_(False) if linear.bias is not None else None
        layer.lora_A = nn.Parameter(torch.empty(layer.lora_A.shape, device=w.device, dtype=w.dtype))
        layer.lora_B = nn.Parameter(torch.empty(layer.lora_B.shape, device=w.device, dtype=w.dtype))
        layer.reset_lora_parameters()
        return layer

    def forward(self, x: Tensor, shared_input: bool | None = None) -> Tensor:
        """``x [N*Bsz, ..., in]`` (or ``[Bsz, ..., in]`` shared) -> ``[N*Bsz, ..., out]``."""
        shared = self.shared_input if shared_input is None else shared_input
        weight = self.weight.t() if self.fan_in_fan_out else self.weight
        if self.training and self.lora_dropout > 0:
            return self._forward_lora_dropout(x, weight, shared)
        return fused_lora_ensemble_linear(x, weight, self.bias, self.lora_A, self.lora_B,
                                          self.scaling, shared_input=shared, backend=self.backend)

    def _forward_lora_dropout(self, x: Tensor, weight: Tensor, shared: bool) -> Tensor:
        # y = x W0^T + b + s (dropout(x) A^T) B^T: the base reads x, the delta the dropped x, so the
        # one-input fused op does not apply. Cost: the base GEMM once, two batched rank-r GEMMs.
        validate_inputs(x, weight, self.bias, self.lora_A, self.lora_B, shared)
        num_members = self.lora_A.shape[0]
        base = F.linear(x, weight, self.bias)
        if shared:  # one base for every member, a dropout mask per member
            base, x = replicate_members(base, num_members), replicate_members(x, num_members)
        rows = F.dropout(x, self.lora_dropout, training=True).reshape(num_members, -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(rows, self.lora_A.transpose(1, 2)), self.lora_B.transpose(1, 2))
        return base + self.scaling * delta.view(base.shape)

    def merged_member(self, member: int) -> nn.Module:
        """Member ``member`` as a plain layer with ``W0 + scaling * B[n] @ A[n]`` merged in (computed
        in fp32, or fp64 for an fp64 layer; stored in the layer's dtype): an ``nn.Linear``, or with
        ``fan_in_fan_out`` an HF ``Conv1D``. The result is independent of this layer."""
        if not 0 <= member < self.num_members:
            raise IndexError(f"member must be in [0, {self.num_members}), got {member}")
        w = self.weight
        compute = torch.promote_types(w.dtype, torch.float32)
        delta = self.lora_B[member].detach().to(compute) @ self.lora_A[member].detach().to(compute)
        if self.fan_in_fan_out:
            from transformers.pytorch_utils import Conv1D  # a Conv1D was wrapped: transformers is installed

            layer = Conv1D(self.out_features, self.in_features).to(device=w.device, dtype=w.dtype)
            delta = delta.t()
        else:
            layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                              device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.weight.copy_(w.to(compute) + self.scaling * delta)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_members={self.num_members}, rank={self.rank}, scaling={self.scaling:g}, "
                f"bias={self.bias is not None}, lora_dropout={self.lora_dropout:g}, "
                f"fan_in_fan_out={self.fan_in_fan_out}, shared_input={self.shared_input}, backend={self.backend!r}")


def lora_scaling(alpha: float | None, rank: int, use_rslora: bool = False) -> float:
    """``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA), or 1.0 without ``alpha`` (the paper's code)."""
    if alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


def check_lora_options(init: str, alpha: float | None, use_rslora: bool, lora_dropout: float) -> None:
    """Raise ``ValueError`` for an unknown ``init``, rsLoRA without ``alpha``, or a dropout outside [0, 1)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if use_rslora and alpha is None:
        raise ValueError("use_rslora=True scales by alpha / sqrt(rank): pass alpha")
    if not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be a float in [0, 1), got {lora_dropout!r}")
