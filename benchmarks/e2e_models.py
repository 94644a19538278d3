"""End-to-end providers: a torchvision ViT (random weights, nothing downloaded) as a 16-member
LoRA-Ensemble, and the ways to run the same ensemble.

==================  =====================================================================
provider            model
==================  =====================================================================
``triton``/``cuda`` ``lora_ensemble.LoRAEnsemble(vit, N, r, backend=name)`` (CUDA only)
``bmm``             the same with ``backend="torch"``
``vmap``            the same ensemble with every LoRA layer swapped for the paper's vmap layer
                    (``W0`` copied N times, :class:`benchmarks.baselines.VmapLoRAEnsembleLinear`),
                    on the package's member-major batch-first rows; the paper's seq-first,
                    member-fastest layout is benchmarked per layer only (``vmap_paper`` of
                    :mod:`benchmarks.providers`): a whole model in it would need the paper's
                    attention as well
``vmap_shared_w0``  the vmap layer without the ``W0`` copies
``explicit``        N independent full ViTs run one after the other on the ``B`` images (the
                    paper's Explicit Ensemble; training updates all their parameters)
``graphed``         the fused-backend ensemble (the first of ``triton``, ``cuda`` available, as
                    ``backend="auto"`` picks) under ``torch.compile(mode="reduce-overhead")``:
                    CUDA graphs replayed, no launch overhead (CUDA only)
``limit``           one plain ViT on the ``N*B`` images: what an ensemble should cost at best.
                    Training differentiates only the q, k, v biases of the first block, so its
                    backward runs the same chain as the ensemble's (down to the first LoRA
                    layers' outputs) without any weight gradient
==================  =====================================================================

Every model runs the same attention code: torchvision's ``nn.MultiheadAttention`` is swapped for
:class:`lora_ensemble.attention.ExplicitMultiheadAttention` (as ``LoRAEnsemble`` does), so the
providers differ only in their LoRA layers and in how they batch the members.

LoRA-Ensemble targets are torchvision's q, k, v and out_proj in every block (the paper's set), the
heads one linear per member; the ViT is built and wrapped on the CPU, then moved to the device. Every
LoRA factor is random (``lora_B`` is not left at its zero init).
A run maps images ``[B, 3, H, W]`` to logits ``[N, B, C]`` (``limit``: ``[N*B, C]`` from ``N*B``
images); ``trainable`` are the tensors a training step differentiates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_ensemble import LoRAEnsemble
from lora_ensemble._optional import optional_dependency
from lora_ensemble.attention import replace_multihead_attention

from .baselines import VmapLoRAEnsembleLinear
from .providers import FUSED_PROVIDERS, provider_unavailable_reason
from .shapes import EndToEndShape

with optional_dependency("the end-to-end benchmarks"):
    from torchvision.models import VisionTransformer

__all__ = ["E2E_PROVIDERS", "E2ERun", "build_e2e_run", "e2e_unavailable_reason", "make_e2e_step", "plain_vit"]

E2E_PROVIDERS: tuple[str, ...] = FUSED_PROVIDERS + ("graphed", "bmm", "vmap", "vmap_shared_w0", "explicit", "limit")


def _graphed_backend(device: torch.device) -> str | None:
    """The fused backend of the ``graphed`` provider on ``device``: the first available, or None."""
    return next((b for b in FUSED_PROVIDERS if provider_unavailable_reason(b, device) is None), None)


def e2e_unavailable_reason(provider: str, device: torch.device) -> str | None:
    """Why ``provider`` is not benchmarked end to end on ``device``, or None."""
    if provider not in E2E_PROVIDERS:
        return f"unknown end-to-end provider {provider!r}; choose one of {E2E_PROVIDERS}"
    if provider == "graphed":
        if device.type != "cuda":
            return "torch.compile(mode='reduce-overhead') records CUDA graphs: CUDA devices only"
        if _graphed_backend(device) is None:
            return "no fused backend is available: " + "; ".join(
                str(provider_unavailable_reason(b, device)) for b in FUSED_PROVIDERS)
    return provider_unavailable_reason(provider, device) if provider in FUSED_PROVIDERS else None


def plain_vit(shape: EndToEndShape, device: torch.device, dtype: torch.dtype) -> VisionTransformer:
    """A randomly initialised torchvision ``VisionTransformer`` of ``shape``'s size, its attention
    made explicit (q, k, v and out_proj as ``nn.Linear`` modules)."""
    model = VisionTransformer(image_size=shape.image_size, patch_size=shape.patch_size, num_layers=shape.num_layers,
                              num_heads=shape.num_heads, hidden_dim=shape.hidden_dim, mlp_dim=shape.mlp_dim,
                              num_classes=shape.num_classes)
    replace_multihead_attention(model)
    return model.to(device=device, dtype=dtype)


@dataclass
class E2ERun:
    """A model bound to a provider: ``forward(images)`` and the tensors a training step differentiates.
    ``backend``: the LoRA layers' backend (None: no LoRA layers); ``graphed``: ``forward`` replays
    CUDA graphs (torch.compile's reduce-overhead mode), and each step starts a new graph step."""

    model: nn.Module
    forward: Callable[[Tensor], Tensor]
    trainable: list[Tensor]
    backend: str | None = None
    graphed: bool = False


def _lora_ensemble(shape: EndToEndShape, backend: str, device: torch.device, dtype: torch.dtype) -> LoRAEnsemble:
    # Built and wrapped on the CPU, then moved, as a user wraps a pretrained model loaded there.
    ensemble = LoRAEnsemble(plain_vit(shape, torch.device("cpu"), dtype), shape.num_members, shape.rank,
                            backend=backend, head="heads.head")
    with torch.no_grad():
        for layer in ensemble.lora_layers().values():
            layer.lora_B.normal_(0.0, 0.02)
    return ensemble.to(device)


def _trainable(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def build_e2e_run(provider: str, shape: EndToEndShape, device: torch.device, dtype: torch.dtype) -> E2ERun:
    """Build ``provider``'s model for ``shape`` on ``device`` in ``dtype`` (see the module docstring)."""
    reason = e2e_unavailable_reason(provider, device)
    if reason is not None:
        raise RuntimeError(reason)
    if provider == "explicit":
        members = nn.ModuleList(plain_vit(shape, device, dtype) for _ in range(shape.num_members))
        return E2ERun(members, lambda images: torch.stack([m(images) for m in members]), list(members.parameters()))
    if provider == "limit":
        model = plain_vit(shape, device, dtype).requires_grad_(False)
        attention = model.encoder.layers[0].self_attention
        first_biases = [attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias]
        return E2ERun(model, model, [b.requires_grad_(True) for b in first_biases])
    if provider == "graphed":
        backend = _graphed_backend(device)
        ensemble = _lora_ensemble(shape, backend, device, dtype)
        compiled = torch.compile(ensemble, mode="reduce-overhead", dynamic=False)
        return E2ERun(ensemble, compiled, _trainable(ensemble), backend, graphed=True)
    backend = "torch" if provider in ("bmm", "vmap", "vmap_shared_w0") else provider
    ensemble = _lora_ensemble(shape, backend, device, dtype)
    if provider in ("vmap", "vmap_shared_w0"):
        for name, layer in ensemble.lora_layers().items():
            vmapped = VmapLoRAEnsembleLinear(layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                             copy_base=provider == "vmap")
            parent, _, child = name.rpartition(".")
            setattr(ensemble.model.get_submodule(parent), child, vmapped)
    return E2ERun(ensemble, ensemble, _trainable(ensemble), backend)


def make_e2e_step(run: E2ERun, mode: str, images: Tensor, labels: Tensor) -> Callable[[], object]:
    """The callable timed for ``mode``: ``e2e_infer`` (eval mode, no autograd) or ``e2e_train``
    (train mode; forward, cross-entropy of the logits' ``N*B`` rows against ``labels [N*B]``,
    gradients of ``run.trainable``). A graphed run marks the start of each step for torch.compile's
    CUDA graph trees (nothing from the last step is read again)."""
    def begin() -> None:
        if run.graphed:
            torch.compiler.cudagraph_mark_step_begin()

    if mode == "e2e_infer":
        run.model.eval()

        def infer() -> Tensor:
            begin()
            with torch.no_grad():
                return run.forward(images)
        return infer
    if mode != "e2e_train":
        raise ValueError(f"mode must be 'e2e_infer' or 'e2e_train', got {mode!r}")
    run.model.train()

    def train_step() -> tuple[Tensor, ...]:
        begin()
        logits = run.forward(images)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels)
        return torch.autograd.grad(loss, run.trainable)
    return train_step
