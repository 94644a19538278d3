"""Op-level providers: every way of computing one LoRA-Ensemble linear layer, on the same inputs.

==================  ======================================================================
provider            what runs
==================  ======================================================================
``triton``/``cuda`` ``fused_lora_ensemble_linear(..., backend=name)`` (CUDA only)
``bmm``             the ``torch`` backend: one GEMM for the base, batched GEMMs for the delta
``grouped_mm``      the base ``F.linear``, then PyTorch's grouped GEMM for the shrink and the
                    expand with member offsets (prime-rl's multi-LoRA layer; :mod:`.baselines`);
                    skipped with torch's reason where it cannot run (its dtypes, GPUs, alignment)
``compiled``        ``torch.compile`` of that same bmm formulation (static shapes, donated
                    buffers off)
``vmap``            the paper's vmap ensemble, ``W0`` copied N times (:mod:`.baselines`), on the
                    same member-major rows as every other provider
``vmap_paper``      the same vmap layer in the paper's layout: input ``[S, B*N, d]`` sequence-first
                    and member-fastest (a transposed view, as the paper's attention passes it),
                    ``movedim`` to members-first, vmap, ``movedim`` back and ``.contiguous()``
``vmap_shared_w0``  the same with ``W0`` unbatched (``in_dims=None``)
``sequential``      a Python loop over members
``limit``           ``F.linear(x, W0, b)`` over all ``N*M`` rows: the op without LoRA
==================  ======================================================================

A :class:`OpRun` holds a zero-argument forward and the tensors a training step differentiates
(``x`` and the LoRA factors; ``x`` only for ``limit``). :func:`make_step` turns it into the
callable that is timed for a mode: ``fwd`` (inference, no autograd graph), ``bwd`` (the backward of
one recorded forward, replayed) or ``fwd_bwd`` (a training step of the layer).

The ``fwd`` mode is not the same work for every provider: the library's backends always return
``xa = x A^T`` in fp32 (saved for a backward), also under ``no_grad``. :func:`forward_extra_bytes`
gives the bytes each provider writes beyond what inference needs; the report prints them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch._functorch.config
import torch.nn.functional as F
from torch import Tensor

from lora_ensemble import backend_torch, fused_lora_ensemble_linear
from lora_ensemble.backends import unavailable_reason as backend_unavailable_reason

from .baselines import (
    GROUPED_MM_MISSING,
    GroupedMMLoRAEnsembleLinear,
    LoopLoRAEnsembleLinear,
    PaperVmapLoRAEnsembleLinear,
    VmapLoRAEnsembleLinear,
    from_paper_layout,
    grouped_mm,
    grouped_mm_problem,
    to_paper_layout,
)
from .shapes import OpShape

__all__ = ["FUSED_PROVIDERS", "OP_PROVIDERS", "OpRun", "build_op_run", "forward_extra_bytes", "make_step",
           "provider_unavailable_reason"]

FUSED_PROVIDERS: tuple[str, ...] = ("triton", "cuda")
OP_PROVIDERS: tuple[str, ...] = FUSED_PROVIDERS + (
    "bmm", "grouped_mm", "compiled", "vmap", "vmap_paper", "vmap_shared_w0", "sequential", "limit")


def provider_unavailable_reason(provider: str, device: torch.device, dtype: torch.dtype | None = None,
                                shape: OpShape | None = None) -> str | None:
    """Why ``provider`` is not benchmarked on ``device``, or None when it is. ``grouped_mm`` is tried
    on ``dtype`` and the sizes of ``shape`` when both are given (else only its presence is checked)."""
    if provider not in OP_PROVIDERS:
        return f"unknown provider {provider!r}; choose one of {OP_PROVIDERS}"
    if provider == "grouped_mm":
        if dtype is None or shape is None:
            return GROUPED_MM_MISSING if grouped_mm is None else None
        return grouped_mm_problem(device, dtype, shape.d, shape.k, shape.rank)
    if provider in FUSED_PROVIDERS:
        if device.type != "cuda":
            why = "Triton would run its interpreter" if provider == "triton" else "its kernels need a GPU"
            return f"fused backend {provider!r} is benchmarked on CUDA devices only (on a CPU {why})"
        return backend_unavailable_reason(provider, device)
    return None


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass
class OpRun:
    """A provider bound to its inputs: ``forward()`` returns the output rows; ``trainable`` are the
    tensors a training step takes gradients of, the input first. ``to_member_major`` turns the
    output and the input's gradient into member-major rows ``[N*M, ..., f]`` (identity except for
    ``vmap_paper``, whose rows are ``[S, B*N, f]``); it is never part of a timed step."""

    forward: Callable[[], Tensor]
    trainable: list[Tensor]
    to_member_major: Callable[[Tensor], Tensor] = _identity


def forward_extra_bytes(provider: str, num_members: int, rows: int, rank: int, dtype: torch.dtype) -> int:
    """Bytes ``provider``'s ``fwd`` (inference) writes or reads beyond what inference needs, for
    ``num_members * rows`` rows of rank ``rank`` in ``dtype``.

    ``triton``, ``cuda``: ``xa`` written in fp32 (``4 N M r``). ``bmm``: ``xa`` cast to fp32 after
    the batched GEMM, in 16-bit dtypes one more kernel that reads ``2 N M r`` and writes ``4 N M r``
    (in fp32 the cast is a no-op). ``compiled``: nothing (inductor drops the unused cast). The others
    (``grouped_mm`` included: its ``xa`` stays in the input dtype) never form ``xa`` in fp32."""
    elements = num_members * rows * rank
    if provider in FUSED_PROVIDERS:
        return 4 * elements
    if provider == "bmm" and dtype != torch.float32:
        return (torch.finfo(dtype).bits // 8 + 4) * elements
    return 0


def bmm_formulation(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                    scaling: float) -> Tensor:
    """The ``torch`` backend's forward as plain tensor ops (what ``compiled`` hands to torch.compile):
    stacked ``x [N*M, ..., d]`` -> ``[N*M, ..., k]``."""
    num_members, d = lora_A.shape[0], x.shape[-1]
    out, _ = backend_torch.forward(x.reshape(num_members, -1, d), weight, bias, lora_A, lora_B, scaling, False)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def build_op_run(provider: str, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor,
                 lora_B: Tensor, scaling: float, seq_len: int | None = None) -> OpRun:
    """Bind ``provider`` to stacked inputs ``x [N*M, ..., d]``, ``weight [k, d]``, ``bias [k]``,
    ``lora_A [N, r, d]``, ``lora_B [N, k, r]``. ``vmap`` providers need ``scaling == 1`` (the paper's
    module has no scaling) and differentiate their own stacked copies of the LoRA factors.
    ``vmap_paper`` gets a copy of ``x`` in its layout, ``seq_len`` tokens per sequence (None: the
    ``M`` rows of a member are one sequence). Raises RuntimeError with the reason when the provider
    cannot run these inputs here."""
    reason = provider_unavailable_reason(provider, x.device)
    if reason is None and provider == "grouped_mm":
        reason = grouped_mm_problem(x.device, x.dtype, x.shape[-1], weight.shape[0], lora_A.shape[1])
    if reason is not None:
        raise RuntimeError(reason)
    if provider in FUSED_PROVIDERS or provider == "bmm":
        backend = "torch" if provider == "bmm" else provider
        return OpRun(lambda: fused_lora_ensemble_linear(x, weight, bias, lora_A, lora_B, scaling, backend=backend),
                     [x, lora_A, lora_B])
    if provider == "compiled":
        # The bwd mode replays one recorded backward (retain_graph), which AOTAutograd's donated
        # buffers forbid; they only let the compiled backward reuse saved-activation memory. This
        # is a process-wide switch: it is read when a graph is compiled.
        torch._functorch.config.donated_buffer = False
        compiled = torch.compile(bmm_formulation, dynamic=False)
        return OpRun(lambda: compiled(x, weight, bias, lora_A, lora_B, scaling), [x, lora_A, lora_B])
    if provider.startswith("vmap") and scaling != 1.0:
        raise ValueError(f"provider {provider!r} is the paper's module, which has no scaling; got scaling={scaling}")
    if provider == "vmap_paper":
        num_members = lora_A.shape[0]
        rows = x.numel() // x.shape[-1] // num_members
        paper_x = to_paper_layout(x.detach(), num_members, seq_len or rows).detach().requires_grad_(x.requires_grad)
        paper = PaperVmapLoRAEnsembleLinear(weight, bias, lora_A, lora_B)
        return OpRun(lambda: paper(paper_x), [paper_x, paper.lora_A, paper.lora_B],
                     lambda t: from_paper_layout(t, num_members))
    if provider in ("vmap", "vmap_shared_w0"):
        layer = VmapLoRAEnsembleLinear(weight, bias, lora_A, lora_B, copy_base=provider == "vmap")
        return OpRun(lambda: layer(x), [x, layer.lora_A, layer.lora_B])
    if provider == "sequential":
        loop = LoopLoRAEnsembleLinear(weight, bias, lora_A, lora_B, scaling)
        return OpRun(lambda: loop(x), [x, lora_A, lora_B])
    if provider == "grouped_mm":
        grouped = GroupedMMLoRAEnsembleLinear(weight, bias, lora_A, lora_B, scaling)
        return OpRun(lambda: grouped(x), [x, lora_A, lora_B])
    return OpRun(lambda: F.linear(x, weight, bias), [x])  # limit


def make_step(run: OpRun, mode: str) -> Callable[[], object]:
    """The callable timed for ``mode``: ``fwd`` runs ``run.forward`` under ``no_grad``; ``bwd``
    records one forward now and returns a replay of its backward (``retain_graph``); ``fwd_bwd``
    returns forward + backward. The output gradient is random, drawn once here."""
    if mode == "fwd":
        def forward_only() -> Tensor:
            with torch.no_grad():
                return run.forward()
        return forward_only
    if mode == "bwd":
        out = run.forward()
        grad_out = torch.randn_like(out)
        return lambda: torch.autograd.grad(out, run.trainable, grad_out, retain_graph=True)
    if mode == "fwd_bwd":
        with torch.no_grad():
            grad_out = torch.randn_like(run.forward())
        return lambda: torch.autograd.grad(run.forward(), run.trainable, grad_out)
    raise ValueError(f"mode must be 'fwd', 'bwd' or 'fwd_bwd', got {mode!r}")
