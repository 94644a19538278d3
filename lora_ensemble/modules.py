"""``FusedLoRAEnsembleLinear``: a drop-in ``nn.Linear`` replacement holding all N members."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .functional import fused_lora_ensemble_linear

__all__ = ["FusedLoRAEnsembleLinear"]


class FusedLoRAEnsembleLinear(nn.Module):
    """A frozen linear layer ``W0`` shared by ``num_members`` LoRA members, run in one fused op.

    Input ``[N*Bsz, ..., in_features]`` (member-major stacked batch), or ``[Bsz, ..., in_features]``
    when ``shared_input`` is set (every member sees the same rows); output
    ``[N*Bsz, ..., out_features]``. Member ``n`` computes
    ``x @ weight^T + bias + scaling * (x @ lora_A[n]^T) @ lora_B[n]^T``.

    Attributes:
        weight: ``[out_features, in_features]``, frozen (``requires_grad=False``).
        bias: ``[out_features]`` or None, frozen.
        lora_A: ``[N, rank, in_features]``, Xavier-uniform with gain ``init_gain`` (10, as the paper).
        lora_B: ``[N, out_features, rank]``, zeros: every member starts equal to ``W0``.
        scaling: ``alpha / rank`` when ``alpha`` is given, else 1.0 (the paper's code).
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
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("num_members", num_members), ("rank", rank)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.num_members, self.rank = num_members, rank
        self.alpha = alpha
        self.scaling = float(alpha) / rank if alpha is not None else 1.0
        self.backend = backend
        self.init_gain = init_gain
        self.shared_input = shared_input
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(num_members, rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(num_members, out_features, rank, **factory))
        self._reset_base()
        self.reset_lora_parameters()

    def _reset_base(self) -> None:
        # nn.Linear's own initialisation.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def reset_lora_parameters(self) -> None:
        """``lora_B = 0`` and each ``lora_A[n]`` Xavier-uniform with gain ``init_gain``."""
        with torch.no_grad():
            for member in self.lora_A:
                nn.init.xavier_uniform_(member, gain=self.init_gain)
            self.lora_B.zero_()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        num_members: int,
        rank: int,
        alpha: float | None = None,
        backend: str = "auto",
        init_gain: float = 10.0,
        shared_input: bool = False,
    ) -> FusedLoRAEnsembleLinear:
        """Wrap an existing ``nn.Linear``: its ``weight`` and ``bias`` Parameters are shared, not
        copied, and frozen (``requires_grad_(False)``); the LoRA factors are freshly initialised."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, num_members, rank, alpha=alpha,
                    bias=linear.bias is not None, backend=backend, device="meta", dtype=w.dtype,
                    init_gain=init_gain, shared_input=shared_input)
        layer.weight = w.requires_grad_(False)
        layer.bias = linear.bias.requires_grad_(False) if linear.bias is not None else None
        layer.lora_A = nn.Parameter(torch.empty(layer.lora_A.shape, device=w.device, dtype=w.dtype))
        layer.lora_B = nn.Parameter(torch.empty(layer.lora_B.shape, device=w.device, dtype=w.dtype))
        layer.reset_lora_parameters()
        return layer

    def forward(self, x: Tensor, shared_input: bool | None = None) -> Tensor:
        """``x [N*Bsz, ..., in]`` (or ``[Bsz, ..., in]`` shared) -> ``[N*Bsz, ..., out]``."""
        shared = self.shared_input if shared_input is None else shared_input
        return fused_lora_ensemble_linear(x, self.weight, self.bias, self.lora_A, self.lora_B,
                                          self.scaling, shared_input=shared, backend=self.backend)

    def merged_member(self, member: int) -> nn.Linear:
        """Member ``member`` as a plain ``nn.Linear`` with ``W0 + scaling * B[n] @ A[n]`` merged in
        (computed in fp32, stored in the layer's dtype); the result is independent of this layer."""
        if not 0 <= member < self.num_members:
            raise IndexError(f"member must be in [0, {self.num_members}), got {member}")
        w = self.weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=w.device, dtype=w.dtype)
        with torch.no_grad():
            delta = self.lora_B[member].float() @ self.lora_A[member].float()
            linear.weight.copy_(w.float() + self.scaling * delta)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_members={self.num_members}, rank={self.rank}, scaling={self.scaling:g}, "
                f"bias={self.bias is not None}, shared_input={self.shared_input}, backend={self.backend!r}")
