"""``fused_lora_ensemble_linear``: validate, lay the rows out per member, run the op.

The eager path is kept short (a call of a small layer costs little more than the PyTorch ops a user
would write by hand): one cheap check of the common case before the detailed one, a cached backend
choice, and :func:`lora_ensemble.ops.fused_linear_apply`.

Dtypes: ``x``, ``weight`` and ``bias`` share one dtype, the compute dtype (under ``torch.autocast``,
the autocast dtype: every floating input is cast to it). ``lora_A`` / ``lora_B`` may live in another
floating dtype (an fp32 adapter on a bf16 base, as peft keeps it): they are cast to the compute dtype
here, a pass over the adapters only (``N r (d + k)`` elements), never over the activations; their
gradients come back through that cast and reach the parameters in the adapter dtype.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
from torch import Tensor

from .auto_backend import auto_backend
from .backends import in_dtype, resolve_backend
from .layout import stacked_output_shape
from .ops import fused_linear_apply, lora_delta_apply

__all__ = ["fused_lora_ensemble_linear", "lora_ensemble_delta", "validate_delta_inputs", "validate_inputs"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


_resolve_cached = functools.lru_cache(maxsize=256)(resolve_backend)


@torch.compiler.assume_constant_result
def _resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    # Constant for given arguments: torch.compile folds it instead of tracing imports; cached in eager.
    # "auto" where the choice depends on the shape (CUDA tensors): auto_backend decides per call.
    return _resolve_cached(backend, device, dtype, True)


@torch.compiler.assume_constant_result
def _autocast_available(device_type: str) -> bool:
    # torch 2.11's dynamo cannot trace torch.amp.is_autocast_available (a skipped C function), so
    # the query is folded to a constant at trace time instead of breaking the graph.
    return torch.amp.is_autocast_available(device_type)


def _factors_well_formed(x: Tensor, lora_A: Tensor, lora_B: Tensor, k: int, d: int, shared_input: bool) -> bool:
    """Whether ``lora_A [N, r, d]`` and ``lora_B [N, k, r]`` fit ``x [..., d]`` (stacked: ``N`` divides
    its batch), all tensors of a supported dtype on ``x``'s device; False for anything else."""
    if not (isinstance(x, Tensor) and isinstance(lora_A, Tensor) and isinstance(lora_B, Tensor)):
        return False
    try:
        num_members, rank, d_a = lora_A.shape
    except ValueError:  # not 3-D
        return False
    x_shape, device = x.shape, x.device
    return (len(x_shape) >= 2 and x_shape[-1] == d == d_a and d >= 1 and num_members >= 1 and rank >= 1
            and lora_B.shape == (num_members, k, rank) and (shared_input or x_shape[0] % num_members == 0)
            and x.dtype in _DTYPES and lora_A.dtype in _DTYPES and lora_B.dtype in _DTYPES
            and lora_A.device == device and lora_B.device == device)


def _well_formed(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                 shared_input: bool) -> bool:
    """Whether :func:`validate_inputs` would pass, in a few comparisons and no messages."""
    if not (isinstance(weight, Tensor) and weight.dim() == 2):
        return False
    k, d = weight.shape
    if not _factors_well_formed(x, lora_A, lora_B, k, d, shared_input):
        return False
    dtype, device = x.dtype, x.device
    return (weight.dtype == dtype and weight.device == device
            and (bias is None or (isinstance(bias, Tensor) and bias.shape == (k,) and bias.dtype == dtype
                                  and bias.device == device)))


def _check_tensors(**named: Tensor | None) -> None:
    for name, t in named.items():
        if not (isinstance(t, Tensor) or (t is None and name == "bias")):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_factor_dims(lora_A: Tensor, lora_B: Tensor) -> None:
    if lora_A.dim() != 3:
        raise ValueError(f"lora_A must be 3-D [N, r, d], got shape {tuple(lora_A.shape)}")
    if lora_B.dim() != 3:
        raise ValueError(f"lora_B must be 3-D [N, k, r], got shape {tuple(lora_B.shape)}")


def _check_factors(x: Tensor, lora_A: Tensor, lora_B: Tensor, k: int, d: int, shared_input: bool,
                   reference: str) -> None:
    """The shapes of ``lora_A [N, r, d]``, ``lora_B [N, k, r]`` and of the stacked batch, for the ``k``
    and ``d`` given by ``reference`` (the shape that fixed them, for the messages)."""
    _check_factor_dims(lora_A, lora_B)
    num_members, rank, d_a = lora_A.shape
    if x.shape[-1] != d:
        raise ValueError(f"x's last dim {x.shape[-1]} (x shape {tuple(x.shape)}) != in_features {d} ({reference})")
    if d_a != d:
        raise ValueError(f"lora_A shape {tuple(lora_A.shape)} must be [N, r, d] with d={d} ({reference})")
    if num_members < 1 or rank < 1:
        raise ValueError(f"lora_A shape {tuple(lora_A.shape)} needs N >= 1 members and rank r >= 1")
    if d < 1:
        raise ValueError(f"in_features d must be >= 1, got d=0 (x shape {tuple(x.shape)}, {reference})")
    if tuple(lora_B.shape) != (num_members, k, rank):
        raise ValueError(f"lora_B shape {tuple(lora_B.shape)} must be [N, k, r] = {(num_members, k, rank)} "
                         f"(lora_A shape {tuple(lora_A.shape)}, {reference})")
    if not shared_input and x.shape[0] % num_members != 0:
        raise ValueError(f"x's leading dim {x.shape[0]} (x shape {tuple(x.shape)}) is not divisible by "
                         f"num_members N={num_members}; stacked inputs are [N*Bsz, ..., d], member-major")


def _check_scaling(scaling: float) -> float:
    """``scaling`` as a finite Python float (a NaN or Inf scaling would not reach every backend's output alike:
    MKL's ``baddbmm`` drops a NaN ``alpha`` above small sizes)."""
    if type(scaling) is float and scaling - scaling == 0.0:  # a finite float, the common case: no call
        return scaling
    if not isinstance(scaling, (numbers.Real, Tensor)) or (isinstance(scaling, Tensor) and scaling.numel() != 1):
        raise TypeError(f"scaling must be a real number, got {scaling!r}")
    value = float(scaling)
    if not math.isfinite(value):
        raise ValueError(f"scaling must be finite, got {value} (alpha / rank of a LoRA layer)")
    return value


def _check_dtypes_and_devices(compute: dict[str, Tensor], factors: dict[str, Tensor]) -> None:
    """``compute`` tensors share one supported dtype; the LoRA ``factors`` have a supported floating
    dtype of their own; all share one device."""
    for name, t in {**compute, **factors}.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} dtype {t.dtype} is not supported; use one of {_DTYPES}")
    dtypes = {n: t.dtype for n, t in compute.items()}
    if len(set(dtypes.values())) != 1:
        raise TypeError(f"{', '.join(compute)} must have one dtype (the compute dtype), got {dtypes}")
    devices = {n: t.device for n, t in {**compute, **factors}.items()}
    if len(set(devices.values())) != 1:
        raise RuntimeError(f"all inputs must be on one device, got {devices}")


def validate_inputs(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    shared_input: bool,
) -> None:
    """Check ranks, shapes, dtypes and devices; raise a message naming the argument and shapes.

    Raises:
        TypeError: a non-tensor argument, an unsupported dtype, or ``x``, ``weight``, ``bias`` in
            different dtypes (the LoRA factors may have their own floating dtype).
        ValueError: a wrong rank or shape, or a stacked batch not divisible by ``num_members``.
        RuntimeError: tensors on different devices.
    """
    if _well_formed(x, weight, bias, lora_A, lora_B, shared_input):
        return
    _check_tensors(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims [..., d], got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [k, d], got shape {tuple(weight.shape)}")
    k, d = weight.shape
    _check_factors(x, lora_A, lora_B, k, d, shared_input, f"weight shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (k,):
        raise ValueError(f"bias shape {tuple(bias.shape)} must be [k] = ({k},) (weight shape {tuple(weight.shape)})")
    compute = {"x": x, "weight": weight, **({"bias": bias} if bias is not None else {})}
    _check_dtypes_and_devices(compute, {"lora_A": lora_A, "lora_B": lora_B})


def validate_delta_inputs(x: Tensor, base: Tensor, lora_A: Tensor, lora_B: Tensor, shared_input: bool) -> None:
    """:func:`validate_inputs` for :func:`lora_ensemble_delta`: ``base`` is the base layer's output,
    ``x``'s shape with the last dim ``k`` (``lora_B``'s), in ``x``'s dtype."""
    _check_tensors(x=x, base=base, lora_A=lora_A, lora_B=lora_B)
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims [..., d], got shape {tuple(x.shape)}")
    _check_factor_dims(lora_A, lora_B)
    k, d = lora_B.shape[1], lora_A.shape[2]
    if (_factors_well_formed(x, lora_A, lora_B, k, d, shared_input) and base.shape == (*x.shape[:-1], k)
            and base.dtype == x.dtype and base.device == x.device):
        return
    _check_factors(x, lora_A, lora_B, k, d, shared_input, f"lora_A shape {tuple(lora_A.shape)}")
    if tuple(base.shape) != (*x.shape[:-1], k):
        raise ValueError(f"base shape {tuple(base.shape)} must be x's shape with last dim k: {(*x.shape[:-1], k)} "
                         f"(x shape {tuple(x.shape)}, lora_B shape {tuple(lora_B.shape)})")
    _check_dtypes_and_devices({"x": x, "base": base}, {"lora_A": lora_A, "lora_B": lora_B})


def _in_autocast_dtype(x: Tensor, *tensors: Tensor | None) -> tuple:
    """Under ``torch.autocast`` on ``x``'s device: ``(x, *tensors)`` with every floating tensor in the
    autocast dtype (activations of an earlier autocast op may already be low precision while the
    parameters are fp32); otherwise unchanged."""
    if not torch.compiler.is_compiling() and not torch._C._is_any_autocast_enabled():
        return (x, *tensors)  # eager, no autocast anywhere: one C call instead of the ~1 µs queries below
    if not (isinstance(x, Tensor) and _autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in (x, *tensors))


def _factors_in(dtype: torch.dtype, lora_A: Tensor, lora_B: Tensor) -> tuple[Tensor, Tensor]:
    """The LoRA factors in the compute dtype (a pass over the adapters only), contiguous."""
    return in_dtype(lora_A, dtype).contiguous(), in_dtype(lora_B, dtype).contiguous()


def fused_lora_ensemble_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float = 1.0,
    shared_input: bool = False,
    backend: str = "auto",
) -> Tensor:
    """All members of a LoRA-Ensemble linear layer in one op.

    ``y[n] = x[n] @ weight^T + bias + scaling * (x[n] @ lora_A[n]^T) @ lora_B[n]^T``

    Args:
        x: stacked ``[N*Bsz, ..., d]``, member-major (rows ``n*Bsz:(n+1)*Bsz`` are member ``n``),
            or with ``shared_input`` ``[Bsz, ..., d]``, the same rows for every member.
        weight: the shared frozen ``W0 [k, d]`` (nn.Linear layout).
        bias: ``[k]`` or None.
        lora_A: ``[N, r, d]``, in the compute dtype or its own (cast to the compute dtype here).
        lora_B: ``[N, k, r]``, likewise.
        scaling: ``s`` (``alpha / r`` in LoRA terms), finite.
        shared_input: every member sees the same ``x``; ``x @ W0^T`` is computed once.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``[N*Bsz, ..., k]``, member-major, in the inputs' dtype (the autocast dtype under autocast).

    Example::

        >>> x = torch.randn(4 * 2, 5, 16)                       # N=4 members, Bsz=2, 5 tokens
        >>> W0, A, B = torch.randn(8, 16), torch.randn(4, 2, 16), torch.randn(4, 8, 2)
        >>> fused_lora_ensemble_linear(x, W0, None, A, B).shape
        torch.Size([8, 5, 8])
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    scaling = _check_scaling(scaling)
    x, weight, bias, lora_A, lora_B = _in_autocast_dtype(x, weight, bias, lora_A, lora_B)
    validate_inputs(x, weight, bias, lora_A, lora_B, shared_input)
    name = _resolve(backend, x.device, x.dtype)
    lora_A, lora_B = _factors_in(x.dtype, lora_A, lora_B)
    num_members = lora_A.shape[0]
    k, d = weight.shape
    rows = x.reshape(-1, d) if shared_input else x.reshape(num_members, -1, d)
    if name == "auto":
        name = auto_backend(rows, weight, bias, lora_A, lora_B, scaling, shared_input)
    out = fused_linear_apply(
        rows.contiguous(),
        weight.contiguous() if name == "cuda" else weight,  # torch and triton read any strides (Conv1D's W0^T)
        bias.contiguous() if bias is not None else None,
        lora_A,
        lora_B,
        scaling,
        bool(shared_input),
        name,
    )
    return out.reshape(*stacked_output_shape(x.shape, num_members, shared_input, k))  # unpacked: ~0.6 µs less


def lora_ensemble_delta(
    x: Tensor,
    base: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float = 1.0,
    shared_input: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Every member's low-rank update on top of a base layer's output, in one op (shrink and expand
    fused): ``y[n] = base[n] + scaling * (x[n] @ lora_A[n]^T) @ lora_B[n]^T``.

    For base layers the fused kernels cannot read (bitsandbytes 4/8-bit, torchao-quantized linears):
    the layer computes ``base = layer(x)`` itself and this adds the members. Gradients flow to ``x``
    (the low-rank term only; the layer's own backward adds its part through ``base``), ``base``,
    ``lora_A`` and ``lora_B``.

    Args:
        x: stacked ``[N*Bsz, ..., d]`` or, with ``shared_input``, ``[Bsz, ..., d]``.
        base: the base layer's output on ``x``: ``x``'s shape with the last dim ``k``, ``x``'s dtype.
        lora_A: ``[N, r, d]``, in ``x``'s dtype or its own (cast here).
        lora_B: ``[N, k, r]``, likewise.
        scaling: ``s``.
        shared_input: every member sees the same ``x`` (and so the same ``base``).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``[N*Bsz, ..., k]``, member-major, in ``x``'s dtype.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    scaling = _check_scaling(scaling)
    x, base, lora_A, lora_B = _in_autocast_dtype(x, base, lora_A, lora_B)
    validate_delta_inputs(x, base, lora_A, lora_B, shared_input)
    name = _resolve(backend, x.device, x.dtype)
    lora_A, lora_B = _factors_in(x.dtype, lora_A, lora_B)
    num_members, k, d = lora_A.shape[0], lora_B.shape[1], x.shape[-1]
    if shared_input:
        rows, base_rows = x.reshape(-1, d), base.reshape(-1, k)
    else:
        rows, base_rows = x.reshape(num_members, -1, d), base.reshape(num_members, -1, k)
    if name == "auto":
        name = auto_backend(rows, None, None, lora_A, lora_B, scaling, shared_input, base=base_rows)
    out = lora_delta_apply(rows.contiguous(), base_rows.contiguous(), lora_A, lora_B, scaling,
                           bool(shared_input), name)
    return out.reshape(*stacked_output_shape(x.shape, num_members, shared_input, k))  # unpacked: ~0.6 µs less
