"""LoRAEnsemble refuses what it cannot wrap, before touching the model: an already wrapped model, a rank
above a target layer's sizes, a misspelt backend name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_ensemble import LoRAEnsemble


def vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)


def _flags(module: nn.Module) -> list[tuple[str, bool]]:
    return [(name, p.requires_grad) for name, p in module.named_parameters()]


@pytest.mark.parametrize("options", [{}, {"target_modules": ["fc1"], "head": None}], ids=["default", "fc1-no-head"])
def test_wrapping_a_wrapped_model_is_refused_and_leaves_the_first_ensemble_trainable(options: dict) -> None:
    first = LoRAEnsemble(vit(), num_members=3, rank=4)
    flags, modules = _flags(first), [type(m) for m in first.modules()]
    for model in (first.model, first):
        with pytest.raises(ValueError, match=r"is already wrapped: it holds 5 LoRA-Ensemble layers or per-member "
                                             r"heads \((model\.)?blocks\.0\.attn\.qkv \(FusedLoRAEnsembleLinear\)"):
            LoRAEnsemble(model, num_members=3, rank=4, **options)
    assert _flags(first) == flags and [type(m) for m in first.modules()] == modules
    assert sum(p.requires_grad for p in first.parameters()) == 10


def test_rank_above_a_target_layer_is_refused_naming_the_layer() -> None:
    model = vit()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"target blocks\.0\.attn\.qkv: rank 65 is above min\(in_features, "
                                         r"out_features\) = min\(64, 192\) = 64"):
        LoRAEnsemble(model, num_members=2, rank=65)
    assert [type(m) for m in model.modules()] == before and all(p.requires_grad for p in model.parameters())
    assert LoRAEnsemble(model, num_members=2, rank=64).rank == 64


def test_misspelt_backend_is_refused_at_construction() -> None:
    model = vit()
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton', 'cuda'\), got 'foo'"):
        LoRAEnsemble(model, num_members=2, rank=4, backend="foo")
    assert all(p.requires_grad for p in model.parameters())


def test_a_valid_backend_unavailable_here_fails_at_the_call() -> None:
    if torch.cuda.is_available():
        pytest.skip("the cuda backend may run here")
    ensemble = LoRAEnsemble(vit(), num_members=2, rank=4, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        ensemble(torch.randn(1, 3, 32, 32))
