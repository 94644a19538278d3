"""The baselines the fused op is measured against, as drop-in layers (stacked ``[N*B, ..., d]`` input,
member-major, like :class:`lora_ensemble.FusedLoRAEnsembleLinear`).

* :class:`VmapLoRAEnsembleLinear`: the LoRA-Ensemble paper's ``EnsembleLoRA`` (prs-eth/LoRA-Ensemble
  ``models/lora.py``): N per-member LoRA modules, their state stacked with
  ``torch.func.stack_module_state`` (which copies the shared ``W0`` N times), run through
  ``torch.func.vmap`` over ``functional_call``. ``copy_base=False`` is the same code with ``W0``
  and its bias left unbatched (``in_dims=None``): no copies, and vmap turns ``x W0^T`` into one GEMM.
* :class:`PaperVmapLoRAEnsembleLinear`: the same vmap layer in the paper's data layout as well. Its
  input arrives sequence-first and member-fastest, ``[S, B*N, d]`` (the paper repeats each image N
  times at the model entry, ``x.repeat_interleave(N, 0)``, and its attention hands the projections
  a seq-first transposed view); the layer does ``x.view(S, B, N, d).movedim(2, 0)``, the vmap, then
  ``movedim(0, 2).contiguous()`` (one copy of its output) and a view back to ``[S, B*N, k]``.
  :func:`to_paper_layout` and :func:`from_paper_layout` convert member-major rows to and from it.
* :class:`LoopLoRAEnsembleLinear`: a Python loop over members, one ``F.linear`` plus the low-rank
  update per member (an Explicit-Ensemble-style loop).
* :class:`GroupedMMLoRAEnsembleLinear`: what PyTorch now ships for many adapters over one base, as
  prime-rl's multi-LoRA layer uses it: the base ``F.linear`` over all rows, then PyTorch's grouped
  GEMM (:func:`grouped_mm`) for the shrink ``x A^T`` and again for the expand, each member's rows
  delimited by offsets.

All compute ``y[n] = x[n] W0^T + b + s (x[n] A[n]^T) B[n]^T``; the paper's module has no scaling
factor (``s = 1``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

__all__ = ["GroupedMMLoRAEnsembleLinear", "LoopLoRAEnsembleLinear", "PaperLoRALinear", "PaperVmapLoRAEnsembleLinear",
           "VmapLoRAEnsembleLinear", "GROUPED_MM_MISSING", "from_paper_layout", "grouped_mm", "grouped_mm_problem",
           "to_paper_layout"]


class PaperLoRALinear(nn.Module):
    """One member as the paper's ``LoRA`` module writes it: ``w(x) + w_b(w_a(x))``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.w = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.w_a = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.w_b = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.w(x) + self.w_b(self.w_a(x))


# Parameter names of PaperLoRALinear -> attribute names on VmapLoRAEnsembleLinear.
_STACKED_NAMES = {"w.weight": "weight", "w.bias": "bias", "w_a.weight": "lora_A", "w_b.weight": "lora_B"}


class VmapLoRAEnsembleLinear(nn.Module):
    """The paper's vmap ensemble layer, built from the factors of a LoRA-Ensemble linear layer.

    Args:
        weight: ``W0 [k, d]`` (frozen).
        bias: ``[k]`` or None (frozen).
        lora_A: ``[N, r, d]``; copied into the stacked state (trainable).
        lora_B: ``[N, k, r]``; copied into the stacked state (trainable).
        copy_base: stack ``W0`` and ``bias`` N times as ``stack_module_state`` does (the paper);
            False keeps one ``W0`` and vmaps it with ``in_dims=None``.

    Attributes:
        weight: ``[N, k, d]`` with ``copy_base``, else ``[k, d]``; ``bias`` likewise.
        lora_A: ``[N, r, d]``.  lora_B: ``[N, k, r]``.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                 copy_base: bool = True) -> None:
        super().__init__()
        num_members, rank, d = lora_A.shape
        k = weight.shape[0]
        self.num_members, self.copy_base = num_members, copy_base
        members = []
        for n in range(num_members):
            member = PaperLoRALinear(d, k, rank, bias=bias is not None, device="meta", dtype=weight.dtype)
            member.w.weight = nn.Parameter(weight.detach(), requires_grad=False)  # shared, as in the paper
            if bias is not None:
                member.w.bias = nn.Parameter(bias.detach(), requires_grad=False)
            member.w_a.weight = nn.Parameter(lora_A[n].detach().clone())
            member.w_b.weight = nn.Parameter(lora_B[n].detach().clone())
            members.append(member)
        if copy_base:
            stacked, _ = stack_module_state(members)
        else:
            stacked = {"w.weight": weight.detach(), "w_a.weight": lora_A.detach().clone().requires_grad_(),
                       "w_b.weight": lora_B.detach().clone().requires_grad_()}
            if bias is not None:
                stacked["w.bias"] = bias.detach()
        for name, tensor in stacked.items():
            self.register_parameter(_STACKED_NAMES[name], nn.Parameter(tensor, requires_grad=tensor.requires_grad))
        if bias is None:
            self.bias = None
        self._in_dims = {name: 0 if copy_base or name.startswith("w_") else None
                         for name in _STACKED_NAMES if name in stacked}
        # The structure functional_call runs, with no storage: kept out of the module tree so that
        # parameters() and .to() never see it.
        self._template = (members[0].to("meta"),)

    def _member(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self._template[0], params, (x,))

    def forward(self, x: Tensor) -> Tensor:
        """``x [N*B, ..., d]`` member-major -> ``[N*B, ..., k]``."""
        params = {name: getattr(self, attr) for name, attr in _STACKED_NAMES.items() if name in self._in_dims}
        rows = x.reshape(self.num_members, x.shape[0] // self.num_members, *x.shape[1:])
        out = vmap(self._member, in_dims=(self._in_dims, 0))(params, rows)
        return out.reshape(x.shape[0], *out.shape[2:])


class PaperVmapLoRAEnsembleLinear(VmapLoRAEnsembleLinear):
    """:class:`VmapLoRAEnsembleLinear` with ``W0`` copied N times, in the paper's layout: sequence-first,
    member-fastest ``[S, B*N, d]`` -> ``[S, B*N, k]`` (the paper's ``EnsembleLoRA.forward``)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor) -> None:
        super().__init__(weight, bias, lora_A, lora_B, copy_base=True)

    def forward(self, x: Tensor) -> Tensor:
        """``x [S, B*N, d]``, member ``n`` of image ``b`` at column ``b*N + n`` -> ``[S, B*N, k]``."""
        params = {name: getattr(self, attr) for name, attr in _STACKED_NAMES.items() if name in self._in_dims}
        seq, batch = x.shape[0], x.shape[1] // self.num_members
        members = x.view(seq, batch, self.num_members, -1).movedim(2, 0)
        out = vmap(self._member, in_dims=(self._in_dims, 0))(params, members)
        return out.movedim(0, 2).contiguous().view(seq, -1, out.shape[-1])


def to_paper_layout(x: Tensor, num_members: int, seq_len: int) -> Tensor:
    """Member-major rows ``x [N*M, ..., d]`` (``M = B*S``: B sequences of ``seq_len`` tokens per
    member) -> ``[S, B*N, d]`` member-fastest, as the paper's attention hands it to a projection: a
    seq-first transposed view of a contiguous batch-first ``[B*N, S, d]`` copy."""
    d = x.shape[-1]
    rows = x.reshape(num_members, -1, seq_len, d)  # [N, B, S, d]
    batch_first = rows.transpose(0, 1).reshape(-1, seq_len, d)  # [B*N, S, d], one copy
    return batch_first.transpose(0, 1)


def from_paper_layout(y: Tensor, num_members: int) -> Tensor:
    """``[S, B*N, f]`` member-fastest -> member-major rows ``[N*B*S, f]`` (the inverse of
    :func:`to_paper_layout` with the row dims flattened)."""
    seq, f = y.shape[0], y.shape[-1]
    return y.reshape(seq, -1, num_members, f).permute(2, 1, 0, 3).reshape(-1, f)


class LoopLoRAEnsembleLinear(nn.Module):
    """A loop over members: ``y[n] = F.linear(x[n], W0, b) + s (x[n] A[n]^T) B[n]^T``, concatenated.

    The tensors are used as given (not copied): ``weight [k, d]``, ``bias [k]`` or None,
    ``lora_A [N, r, d]``, ``lora_B [N, k, r]``.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                 scaling: float = 1.0) -> None:
        super().__init__()
        self.weight, self.bias, self.lora_A, self.lora_B = weight, bias, lora_A, lora_B
        self.scaling = scaling

    def forward(self, x: Tensor) -> Tensor:
        """``x [N*B, ..., d]`` member-major -> ``[N*B, ..., k]``."""
        outs = []
        for x_n, a, b in zip(x.chunk(self.lora_A.shape[0]), self.lora_A, self.lora_B):
            base = F.linear(x_n, self.weight, self.bias)
            outs.append(base + self.scaling * F.linear(F.linear(x_n, a), b))
        return torch.cat(outs)


def _find_grouped_mm() -> tuple[str, Callable[..., Tensor] | None]:
    if hasattr(F, "grouped_mm"):
        return "torch.nn.functional.grouped_mm", F.grouped_mm
    return "torch._grouped_mm", getattr(torch, "_grouped_mm", None)


# PyTorch's grouped GEMM: ``grouped_mm(a [R, K], b [G, K, C], offs=[G] int32) -> [R, C]``, the rows
# ``offs[g-1]:offs[g]`` of ``a`` times ``b[g]``. None when this torch has neither function.
GROUPED_MM_NAME, grouped_mm = _find_grouped_mm()
GROUPED_MM_MISSING = f"torch {torch.__version__} has neither torch.nn.functional.grouped_mm nor torch._grouped_mm"


@functools.cache
def grouped_mm_problem(device: torch.device, dtype: torch.dtype, d: int, k: int, rank: int) -> str | None:
    """Why :class:`GroupedMMLoRAEnsembleLinear` cannot run layers of ``d`` in, ``k`` out, rank ``rank``
    in ``dtype`` on ``device``, or None. Found by running it (forward and backward) on two members of
    one row each: the grouped GEMM's limits (dtypes, GPU architectures, 16-byte aligned strides) vary
    with the torch version and the device, and torch's own message says which one was hit."""
    if grouped_mm is None:
        return GROUPED_MM_MISSING
    x = torch.zeros(2, d, device=device, dtype=dtype, requires_grad=True)
    weight = torch.zeros(k, d, device=device, dtype=dtype)
    lora_A = torch.zeros(2, rank, d, device=device, dtype=dtype, requires_grad=True)
    lora_B = torch.zeros(2, k, rank, device=device, dtype=dtype, requires_grad=True)
    try:
        out = GroupedMMLoRAEnsembleLinear(weight, None, lora_A, lora_B)(x)
        torch.autograd.grad(out, (x, lora_A, lora_B), torch.zeros_like(out))
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        return (f"{GROUPED_MM_NAME} cannot run d={d}, k={k}, r={rank} in {str(dtype).removeprefix('torch.')} on "
                f"{device}: {type(exc).__name__}: {first_line}")
    return None


class GroupedMMLoRAEnsembleLinear(nn.Module):
    """``F.linear(x, W0, b) + s * grouped_mm(grouped_mm(x, A^T), B^T)`` with member offsets, the
    formulation of prime-rl's multi-LoRA linear layer on PyTorch's grouped GEMM.

    The tensors are used as given (not copied): ``weight [k, d]``, ``bias [k]`` or None,
    ``lora_A [N, r, d]``, ``lora_B [N, k, r]``. The rank-``r`` intermediate stays in the input dtype.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                 scaling: float = 1.0) -> None:
        super().__init__()
        if grouped_mm is None:
            raise RuntimeError(GROUPED_MM_MISSING)
        self.weight, self.bias, self.lora_A, self.lora_B = weight, bias, lora_A, lora_B
        self.scaling = scaling
        self._offsets: dict[int, Tensor] = {}  # rows per member -> member end offsets, made once

    def member_offsets(self, rows_per_member: int) -> Tensor:
        """``[N]`` int32 on the layer's device: the end row of each member in the stacked rows."""
        offsets = self._offsets.get(rows_per_member)
        if offsets is None:
            num_members = self.lora_A.shape[0]
            offsets = torch.arange(1, num_members + 1, dtype=torch.int32, device=self.lora_A.device) * rows_per_member
            self._offsets[rows_per_member] = offsets
        return offsets

    def forward(self, x: Tensor) -> Tensor:
        """``x [N*B, ..., d]`` member-major -> ``[N*B, ..., k]``."""
        rows = x.reshape(-1, x.shape[-1])
        offsets = self.member_offsets(rows.shape[0] // self.lora_A.shape[0])
        xa = grouped_mm(rows, self.lora_A.transpose(1, 2), offs=offsets)  # [N*M, r]
        delta = grouped_mm(xa, self.lora_B.transpose(1, 2), offs=offsets)  # [N*M, k]
        return torch.add(F.linear(x, self.weight, self.bias), delta.view(*x.shape[:-1], -1), alpha=self.scaling)
