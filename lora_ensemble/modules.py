"""The LoRA-Ensemble layers: N members' LoRA factors on one frozen base layer.

* :class:`FusedLoRAEnsembleLinear`: a drop-in ``nn.Linear`` (or HF ``Conv1D``) replacement whose
  base ``W0`` the fused kernels read: ``x W0^T + b`` and every member's update in one op.
* :class:`LoRAEnsembleOverBase`: around a base layer the kernels cannot read (bitsandbytes 4/8-bit,
  torchao-quantized, parametrized linears): the layer computes ``base(x)`` itself, and every
  member's update is added in one op (shrink and expand fused, :func:`lora_ensemble_delta`).
* :func:`wrap_linear` picks the one that fits a layer, or says why neither does.

Both keep the LoRA factors in ``adapter_dtype`` (default: the base's dtype; e.g. fp32 factors on a
bf16 base, peft's default): the factors, their gradients and the optimizer's state live in it. The
op casts the factors to the activations' dtype for each call (a pass over the factors, never over
the activations) and accumulates in fp32; their gradients come back in ``adapter_dtype``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .backends import BACKENDS
from .calls import MEMBER_SELECTION
from .functional import fused_lora_ensemble_linear, lora_ensemble_delta
from .layout import replicate_members
from .triton_hash import start_hashing

__all__ = [
    "FusedLoRAEnsembleLinear",
    "LoRAEnsembleLayer",
    "LoRAEnsembleOverBase",
    "check_backend_name",
    "check_lora_options",
    "check_rank",
    "is_hf_conv1d",
    "kernels_can_read",
    "lora_scaling",
    "wrap_linear",
]

INITS = ("paper", "peft")
BACKEND_NAMES = ("auto", *BACKENDS)
# Dtypes of a base weight the fused kernels (torch backend: float64 too) read directly.
_READABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is HF transformers' ``Conv1D`` (GPT-2's projections: ``x @ W + b``, ``W [in, out]``).

    Looked up in ``sys.modules`` only: a model holding a ``Conv1D`` has imported transformers.
    """
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def kernels_can_read(module: nn.Module) -> bool:
    """Whether the fused kernels can read ``module``'s weight as ``W0``: a plain (not parametrized)
    ``nn.Linear`` or HF ``Conv1D`` whose weight and bias are plain float tensors. bitsandbytes'
    ``Linear4bit`` / ``Linear8bitLt`` (integer weights), torchao-quantized linears (tensor-subclass
    weights) and parametrized linears are not."""
    if not (isinstance(module, nn.Linear) or is_hf_conv1d(module)) or parametrize.is_parametrized(module):
        return False
    plain = (torch.Tensor, nn.Parameter)
    return all(t is None or (type(t) in plain and t.dtype in _READABLE_DTYPES) for t in (module.weight, module.bias))


def lora_scaling(alpha: float | None, rank: int, use_rslora: bool = False) -> float:
    """``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA), or 1.0 without ``alpha`` (the paper's code)."""
    if alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


def check_backend_name(backend: str) -> None:
    """Raise ``TypeError`` / ``ValueError`` unless ``backend`` is ``"auto"`` or a backend's name. Whether a
    named backend can run (``"cuda"`` on a machine without a GPU) is checked at the first call, which
    raises a ``RuntimeError`` that says why."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {BACKEND_NAMES}, got {type(backend).__name__}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")


def check_rank(rank: int, in_features: int, out_features: int) -> None:
    """Raise ``ValueError`` for a rank above ``min(in_features, out_features)``: ``B A`` cannot have a
    higher rank than that, so the extra rows of ``A`` and columns of ``B`` only cost compute."""
    if rank > min(in_features, out_features):
        raise ValueError(f"rank {rank} is above min(in_features, out_features) = min({in_features}, {out_features}) "
                         f"= {min(in_features, out_features)}: a rank-{rank} update of a [{out_features}, "
                         f"{in_features}] weight has rank at most {min(in_features, out_features)}; choose "
                         f"rank <= {min(in_features, out_features)}")


def check_lora_options(init: str, alpha: float | None, use_rslora: bool, lora_dropout: float,
                       adapter_dtype: torch.dtype | None = None, backend: str = "auto") -> None:
    """Raise ``ValueError`` for an unknown ``init``, a non-finite ``alpha``, rsLoRA without ``alpha``, a
    dropout outside [0, 1), an ``adapter_dtype`` that is not a floating dtype, or an unknown ``backend``
    name (:func:`check_backend_name`)."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number or None, got {alpha!r}")
    if use_rslora and alpha is None:
        raise ValueError("use_rslora=True scales by alpha / sqrt(rank): pass alpha")
    if not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be a float in [0, 1), got {lora_dropout!r}")
    if adapter_dtype is not None and (not isinstance(adapter_dtype, torch.dtype)
                                      or adapter_dtype not in _READABLE_DTYPES):
        raise ValueError(f"adapter_dtype must be one of {_READABLE_DTYPES} or None, got {adapter_dtype!r}")
    check_backend_name(backend)


def _parameter(module: nn.Module, name: str) -> Tensor | None:
    """``getattr(module, name)`` without ``nn.Module.__getattr__``'s ~0.4 µs (four of them are a tenth
    of a small layer's eager call): a registered Parameter straight from ``_parameters``, anything
    else (``None``, a tensor computed by ``torch.nn.utils.parametrize``) through the attribute."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


class LoRAEnsembleLayer(nn.Module):
    """What every LoRA-Ensemble layer has, whatever its base: ``lora_A [N, r, in]``, ``lora_B [N, out, r]``
    in ``adapter_dtype``, their scaling, initialisation and the LoRA dropout, and the attributes
    ``in_features``, ``out_features``, ``num_members``, ``rank``, ``alpha``, ``use_rslora``, ``init``,
    ``init_gain``, ``lora_dropout``, ``shared_input``, ``backend``."""

    def __init__(self, in_features: int, out_features: int, num_members: int, rank: int, alpha: float | None,
                 backend: str, init: str, init_gain: float, use_rslora: bool, lora_dropout: float,
                 shared_input: bool, device: torch.device | str | None, adapter_dtype: torch.dtype | None,
                 allow_rank_above_size: bool = False) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("num_members", num_members), ("rank", rank)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not allow_rank_above_size:
            check_rank(rank, in_features, out_features)
        check_lora_options(init, alpha, use_rslora, lora_dropout, adapter_dtype, backend)
        self.in_features, self.out_features = in_features, out_features
        self.num_members, self.rank = num_members, rank
        self.alpha, self.use_rslora = alpha, use_rslora
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        self.backend = backend
        self.init, self.init_gain = init, init_gain
        self.lora_dropout = float(lora_dropout)
        self.shared_input = shared_input
        factory = {"device": device, "dtype": adapter_dtype}
        self.lora_A = nn.Parameter(torch.empty(num_members, rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(num_members, out_features, rank, **factory))
        self._factors_placed()

    def _factors_placed(self) -> None:
        """The factors are on their device: on a GPU (or on the CPU of a machine where NVML sees one),
        Triton's once-a-process cache key starts hashing on a thread (:mod:`lora_ensemble.triton_hash`),
        beside the rest of the model's building."""
        start_hashing(self.backend, self.lora_A.device)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LoRAEnsembleLayer:
        """``nn.Module._apply`` (under ``.to``, ``.cuda``, ``.half``, ...), then :meth:`_factors_placed`."""
        module = super()._apply(fn, recurse)
        self._factors_placed()
        return module

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype the LoRA factors (and their gradients and optimizer state) live in."""
        return self.lora_A.dtype

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

    def _dropout_active(self) -> bool:
        return self.training and self.lora_dropout > 0

    def _factors(self) -> tuple[Tensor, Tensor]:
        """``lora_A``, ``lora_B`` of the members this call runs: all of them, or the slice a
        :class:`~lora_ensemble.LoRAEnsemble` member chunk selected on this thread (:mod:`lora_ensemble.calls`)."""
        lora_A, lora_B = _parameter(self, "lora_A"), _parameter(self, "lora_B")
        members = MEMBER_SELECTION.value
        if members is None:
            return lora_A, lora_B
        return lora_A[members], lora_B[members]

    def _dropped_delta(self, x: Tensor, base: Tensor, shared: bool) -> Tensor:
        """``base + s (dropout(x) A^T) B^T`` per member, in one op: every row of the stacked batch, so
        every member, draws its own dropout mask (with a shared input, ``x`` and ``base`` are stacked
        first: one copy per member of this call)."""
        lora_A, lora_B = self._factors()
        if shared:
            x, base = replicate_members(x, lora_A.shape[0]), replicate_members(base, lora_A.shape[0])
        dropped = F.dropout(x, self.lora_dropout, training=True)
        return lora_ensemble_delta(dropped, base, lora_A, lora_B, self.scaling, backend=self.backend)

    def _members_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_members={self.num_members}, rank={self.rank}, scaling={self.scaling:g}, "
                f"adapter_dtype={self.adapter_dtype}, lora_dropout={self.lora_dropout:g}, "
                f"shared_input={self.shared_input}, backend={self.backend!r}")


class FusedLoRAEnsembleLinear(LoRAEnsembleLayer):
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
        lora_A: ``[N, rank, in_features]`` in ``adapter_dtype`` (default: ``dtype``); ``init="paper"``:
            each member Xavier-uniform with gain ``init_gain`` (10, as the LoRA-Ensemble paper);
            ``init="peft"``: each member Kaiming-uniform with ``a=sqrt(5)`` (peft's default).
        lora_B: ``[N, out_features, rank]``, zeros: every member starts equal to ``W0``.
        scaling: ``alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``) when ``alpha`` is given,
            else 1.0 (the paper's code).
        lora_dropout: dropout probability on the LoRA path's input, in training mode only (peft's
            ``lora_dropout``; every row of the stacked batch, so every member, draws its own mask). While
            it is active the layer runs ``F.linear(x, W0, b)`` and then every member's update on the
            dropped input in one op (:func:`lora_ensemble_delta`): two launches instead of one. In eval
            mode, or with ``lora_dropout=0``, the one fused op runs.
        shared_input: default layout of ``forward``'s input.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``; another name is a ``ValueError`` here.
            A named backend this machine cannot run (``"cuda"`` without a GPU) is accepted here and raises a
            ``RuntimeError`` saying why at the first call.

    ``rank`` must be at most ``min(in_features, out_features)`` (a ``ValueError`` otherwise: the update
    ``B A`` cannot have a higher rank) unless ``allow_rank_above_size=True``, which the loaders pass: peft
    saves such adapters, and loading one must give its outputs. ``alpha`` must be finite.
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
        adapter_dtype: torch.dtype | None = None,
        allow_rank_above_size: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, num_members, rank, alpha, backend, init, init_gain, use_rslora,
                         lora_dropout, shared_input, device, adapter_dtype or dtype, allow_rank_above_size)
        factory = {"device": device, "dtype": dtype}
        self.fan_in_fan_out = fan_in_fan_out
        shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self._reset_base()
        self.reset_lora_parameters()

    def _reset_base(self) -> None:
        # nn.Linear's own initialisation (on the [out, in] view when stored transposed).
        nn.init.kaiming_uniform_(self.weight.t() if self.fan_in_fan_out else self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

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
        adapter_dtype: torch.dtype | None = None,
        allow_rank_above_size: bool = False,
    ) -> FusedLoRAEnsembleLinear:
        """Wrap an existing ``nn.Linear`` or HF ``Conv1D`` (then ``fan_in_fan_out=True``): its
        ``weight`` and ``bias`` Parameters are shared, not copied, and frozen
        (``requires_grad_(False)``); the LoRA factors are freshly initialised, in ``adapter_dtype``
        (default: the weight's dtype). ``rank`` and ``backend`` are checked as in the constructor."""
        conv1d = is_hf_conv1d(linear)
        if not isinstance(linear, nn.Linear) and not conv1d:
            raise TypeError(f"linear must be an nn.Linear or transformers' Conv1D, got {type(linear).__name__}")
        w = linear.weight
        in_features, out_features = w.shape if conv1d else (linear.in_features, linear.out_features)
        layer = cls(in_features, out_features, num_members, rank, alpha=alpha,
                    bias=linear.bias is not None, backend=backend, device="meta", dtype=w.dtype,
                    init_gain=init_gain, shared_input=shared_input, init=init, use_rslora=use_rslora,
                    lora_dropout=lora_dropout, fan_in_fan_out=conv1d, adapter_dtype=adapter_dtype,
                    allow_rank_above_size=allow_rank_above_size)
        layer.weight = w.requires_grad_(False)
        layer.bias = linear.bias.requires_grad_(False) if linear.bias is not None else None
        factors = {"device": w.device, "dtype": adapter_dtype or w.dtype}
        layer.lora_A = nn.Parameter(torch.empty(layer.lora_A.shape, **factors))
        layer.lora_B = nn.Parameter(torch.empty(layer.lora_B.shape, **factors))
        layer._factors_placed()
        layer.reset_lora_parameters()
        return layer

    def forward(self, x: Tensor, shared_input: bool | None = None) -> Tensor:
        """``x [N*Bsz, ..., in]`` (or ``[Bsz, ..., in]`` shared) -> ``[N*Bsz, ..., out]``."""
        shared = self.shared_input if shared_input is None else shared_input
        weight, bias = _parameter(self, "weight"), _parameter(self, "bias")
        if self.fan_in_fan_out:
            weight = weight.t()
        if self._dropout_active():
            return self._dropped_delta(x, F.linear(x, weight, bias), shared)
        return fused_lora_ensemble_linear(x, weight, bias, *self._factors(), self.scaling, shared_input=shared,
                                          backend=self.backend)

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
        return f"{self._members_repr()}, bias={self.bias is not None}, fan_in_fan_out={self.fan_in_fan_out}"


class LoRAEnsembleOverBase(LoRAEnsembleLayer):
    """``num_members`` LoRA members over a frozen base layer the fused kernels cannot read.

    Member ``n`` computes ``base_layer(x) + scaling * (dropout(x) @ lora_A[n]^T) @ lora_B[n]^T``: the
    base layer runs as it is (once for a shared input), dequantizing or not as it does, and every
    member's update is added to its output in one op (:func:`lora_ensemble_delta`: shrink and expand
    fused in one launch). Input and output layouts as :class:`FusedLoRAEnsembleLinear`.

    Attributes:
        base_layer: the wrapped layer, frozen (``in_features``, ``out_features`` attributes; output in
            the input's dtype: bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, torchao-quantized
            ``nn.Linear``, parametrized ``nn.Linear``).
        lora_A, lora_B, scaling, lora_dropout, shared_input, backend: as in :class:`FusedLoRAEnsembleLinear`
            (``rank``, ``alpha``, ``backend`` and ``allow_rank_above_size`` are checked as there).
    """

    def __init__(self, base_layer: nn.Module, num_members: int, rank: int, alpha: float | None = None,
                 backend: str = "auto", init_gain: float = 10.0, shared_input: bool = False, init: str = "paper",
                 use_rslora: bool = False, lora_dropout: float = 0.0,
                 adapter_dtype: torch.dtype | None = None, allow_rank_above_size: bool = False) -> None:
        in_features, out_features = getattr(base_layer, "in_features", None), getattr(base_layer, "out_features", None)
        if not isinstance(in_features, int) or not isinstance(out_features, int):
            raise TypeError(f"base_layer {type(base_layer).__name__} needs int in_features and out_features "
                            "attributes (a linear layer)")
        weight = getattr(base_layer, "weight", None)
        device = weight.device if isinstance(weight, Tensor) else None
        super().__init__(in_features, out_features, num_members, rank, alpha, backend, init, init_gain, use_rslora,
                         lora_dropout, shared_input, device, adapter_dtype or _float_dtype_of(base_layer),
                         allow_rank_above_size)
        self.base_layer = base_layer.requires_grad_(False)
        self.reset_lora_parameters()

    def forward(self, x: Tensor, shared_input: bool | None = None) -> Tensor:
        """``x [N*Bsz, ..., in]`` (or ``[Bsz, ..., in]`` shared) -> ``[N*Bsz, ..., out]``."""
        shared = self.shared_input if shared_input is None else shared_input
        base = self.base_layer(x)
        if self._dropout_active():
            return self._dropped_delta(x, base, shared)
        return lora_ensemble_delta(x, base, *self._factors(), self.scaling, shared_input=shared, backend=self.backend)

    def merged_member(self, member: int) -> nn.Module:
        """Not possible: a member's update cannot be merged into a weight the package cannot read."""
        raise TypeError(f"member {member}'s LoRA factors cannot be merged into a {type(self.base_layer).__name__} "
                        "base layer (its weight is quantized or computed): use the ensemble itself, or save the "
                        "members with lora_ensemble.io.save_members / save_peft_adapters")

    def extra_repr(self) -> str:
        return self._members_repr()


def _float_dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype LoRA factors over ``module`` default to: its weight's, when that is a float dtype the
    kernels take (torchao's quantized weights report their float dtype), else its ``compute_dtype``
    (bitsandbytes 4-bit), else float32 (peft's default for adapters on quantized bases)."""
    dtype = getattr(getattr(module, "weight", None), "dtype", None)
    if dtype in _READABLE_DTYPES:
        return dtype
    compute = getattr(module, "compute_dtype", None)
    return compute if compute in _READABLE_DTYPES else torch.float32


def wrap_linear(module: nn.Module, num_members: int, rank: int,
                **options) -> FusedLoRAEnsembleLinear | LoRAEnsembleOverBase:
    """The LoRA-Ensemble layer for ``module``: :class:`FusedLoRAEnsembleLinear` sharing its weight
    when the kernels can read it (:func:`kernels_can_read`), :class:`LoRAEnsembleOverBase` around
    any other ``nn.Linear`` (quantized or parametrized). ``options``: those of the layers.

    Raises:
        TypeError: ``module`` is neither an ``nn.Linear`` (or subclass) nor an HF ``Conv1D``.
    """
    if kernels_can_read(module):
        return FusedLoRAEnsembleLinear.from_linear(module, num_members, rank, **options)
    if isinstance(module, nn.Linear):
        return LoRAEnsembleOverBase(module, num_members, rank, **options)
    raise TypeError(f"cannot wrap a {type(module).__name__}: LoRA-Ensemble layers wrap nn.Linear (plain, "
                    "quantized or parametrized) and transformers' Conv1D")
