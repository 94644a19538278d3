"""LoRAEnsemble on the three model families: member-by-member equality with N independently
LoRA-patched copies, gradients only on LoRA factors and heads, the replication options, and errors."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import Tensor, nn

from lora_ensemble import FusedLoRAEnsembleLinear, LoRAEnsemble
from lora_ensemble.attention import ExplicitMultiheadAttention, replace_multihead_attention
from lora_ensemble.ensemble import EnsembleHead, resolve_target_modules

from .utils import assert_close_named

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NUM_CLASSES = 5


def timm_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=NUM_CLASSES)


def torchvision_vit() -> nn.Module:
    from torchvision.models import VisionTransformer
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=NUM_CLASSES)


def bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=50, max_position_embeddings=16, num_labels=NUM_CLASSES)
    return BertForSequenceClassification(config)


def image_inputs(batch: int) -> tuple[tuple, dict]:
    return (torch.randn(batch, 32, 32, 3).permute(0, 3, 1, 2),), {}  # non-contiguous (channels-last)


def text_inputs(batch: int) -> tuple[tuple, dict]:
    mask = torch.ones(batch, 7, dtype=torch.long)
    mask[0, 4:] = 0  # padding on one row: the mask must follow its row through the replication
    return (), {"input_ids": torch.randint(0, 50, (batch, 7)), "attention_mask": mask}


FAMILIES = {
    "timm": (timm_vit, image_inputs, "blocks"),
    "torchvision": (torchvision_vit, image_inputs, "encoder.layers"),
    "bert": (bert, text_inputs, "bert.encoder"),
}


def logits_of(out) -> Tensor:
    return out if isinstance(out, Tensor) else out.logits


class SingleLoRALinear(nn.Module):
    """One plain LoRA member: ``x W0^T + b + s (x A^T) B^T`` (the per-member model to compare with)."""

    def __init__(self, linear: nn.Linear, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
        super().__init__()
        self.linear, self.lora_A, self.lora_B, self.scaling = linear, lora_A, lora_B, scaling

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x) + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T


def member_model(original: nn.Module, ensemble: LoRAEnsemble, member: int) -> nn.Module:
    """A copy of the original model with member ``member``'s LoRA factors and head patched in."""
    model = copy.deepcopy(original)
    replace_multihead_attention(model)
    for name, layer in ensemble.lora_layers().items():
        parent, _, child = name.rpartition(".")
        linear = model.get_submodule(name)
        setattr(model.get_submodule(parent), child,
                SingleLoRALinear(linear, layer.lora_A[member], layer.lora_B[member], layer.scaling))
    parent, _, child = ensemble.head_name.rpartition(".")
    setattr(model.get_submodule(parent), child, ensemble.head.merged_member(member))
    return model


def randomise_lora(ensemble: LoRAEnsemble) -> None:
    """Non-zero B (the default init makes every member equal W0), different per member."""
    with torch.no_grad():
        for layer in ensemble.lora_layers().values():
            layer.lora_B.normal_(0, 0.05)
            layer.lora_A.mul_(0.05)


@pytest.mark.parametrize("num_members,batch,rank", [(3, 4, 2), (1, 1, 1)])
@pytest.mark.parametrize("family", FAMILIES)
def test_members_equal_independent_lora_copies(family: str, num_members: int, batch: int, rank: int) -> None:
    build, inputs, _ = FAMILIES[family]
    original = build().eval()
    ensemble = LoRAEnsemble(copy.deepcopy(original), num_members=num_members, rank=rank,
                            num_classes=NUM_CLASSES, alpha=4.0).eval()
    randomise_lora(ensemble)
    args, kwargs = inputs(batch)
    with torch.no_grad():
        out = ensemble(*args, **kwargs)
        assert out.shape == (num_members, batch, NUM_CLASSES)
        for member in range(num_members):
            expected = logits_of(member_model(original, ensemble, member).eval()(*args, **kwargs))
            assert_close_named(f"{family} member {member}", out[member], expected.double(), torch.float32)
    if num_members > 1:
        assert not torch.allclose(out[0], out[1]), "members should differ"


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_grads_only_on_lora_and_head(family: str) -> None:
    build, inputs, _ = FAMILIES[family]
    # fresh heads: torchvision initialises its head to zeros, which would stop every gradient
    ensemble = LoRAEnsemble(build(), num_members=2, rank=1, num_classes=NUM_CLASSES)
    randomise_lora(ensemble)
    args, kwargs = inputs(3)
    out = ensemble(*args, **kwargs)
    assert out.shape == (2, 3, NUM_CLASSES)
    targets = torch.randint(0, NUM_CLASSES, (3,))
    nn.functional.cross_entropy(out.reshape(6, -1), targets.repeat(2)).backward()
    trainable = {n for n, p in ensemble.named_parameters() if p.requires_grad}
    expected = {f"model.{name}.lora_{ab}" for name in ensemble.target_names for ab in "AB"}
    expected |= {f"model.{ensemble.head_name}.weight", f"model.{ensemble.head_name}.bias"}
    assert trainable == expected
    for name, p in ensemble.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"


def test_wrapped_layers_share_the_backbone_weights() -> None:
    model = timm_vit()
    qkv = model.blocks[0].attn.qkv
    ensemble = LoRAEnsemble(model, num_members=2, rank=2)
    layer = ensemble.model.blocks[0].attn.qkv
    assert isinstance(layer, FusedLoRAEnsembleLinear)
    assert layer.weight is qkv.weight and layer.bias is qkv.bias
    assert isinstance(ensemble.head, EnsembleHead)


@pytest.mark.parametrize("family", FAMILIES)
def test_replicate_at_and_shared_first_input_equal_the_simple_path(family: str) -> None:
    build, inputs, trunk = FAMILIES[family]
    original = build().eval()
    variants = {
        "entry": {},
        "replicate_at": {"replicate_at": trunk},
        "share_first_input": {"share_first_input": True},
        "both": {"replicate_at": trunk, "share_first_input": True},
    }
    ensembles = {}
    for name, options in variants.items():
        torch.manual_seed(1)
        ensembles[name] = LoRAEnsemble(copy.deepcopy(original), num_members=3, rank=2, **options).eval()
        randomise_lora(ensembles[name])
    args, kwargs = inputs(2)
    grads = {}
    outs = {}
    for name, ensemble in ensembles.items():
        out = ensemble(*args, **kwargs)
        out.pow(2).sum().backward()
        outs[name] = out
        grads[name] = {n: p.grad for n, p in ensemble.named_parameters() if p.requires_grad}
    for name in variants:
        assert_close_named(f"{family} {name} out", outs[name], outs["entry"].double(), torch.float32)
        for pname, g in grads[name].items():
            assert_close_named(f"{family} {name} d{pname}", g, grads["entry"][pname].double(), torch.float32)


def test_shared_first_input_uses_shared_rows_once_per_forward() -> None:
    ensemble = LoRAEnsemble(bert().eval(), num_members=2, rank=2, share_first_input=True).eval()
    seen: dict[str, int] = {}

    def record(name):
        def hook(module, args, kwargs, output):
            seen[name] = args[0].shape[0]
        return hook

    for name, layer in ensemble.lora_layers().items():
        layer.register_forward_hook(record(name), with_kwargs=True)
    args, kwargs = text_inputs(3)
    ensemble(*args, **kwargs)
    shared = sorted(name for name, rows in seen.items() if rows == 3)
    assert shared == ["bert.encoder.layer.0.attention.self.key", "bert.encoder.layer.0.attention.self.query",
                      "bert.encoder.layer.0.attention.self.value"]
    assert all(rows == 6 for name, rows in seen.items() if name not in shared)


def test_target_patterns_and_predicates() -> None:
    model = timm_vit()
    assert resolve_target_modules(model, "blocks.1.attn.*") == ["blocks.1.attn.qkv", "blocks.1.attn.proj"]
    assert resolve_target_modules(model, ["fc2"]) == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    picked = resolve_target_modules(model, lambda name, m: m.out_features == 96)
    assert picked == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]


def test_unknown_target_lists_candidates() -> None:
    with pytest.raises(ValueError, match=r"'query'.*blocks\.0\.attn\.qkv"):
        LoRAEnsemble(timm_vit(), num_members=2, rank=2, target_modules=["qkv", "query"])
    with pytest.raises(ValueError, match="head"):
        LoRAEnsemble(nn.Sequential(nn.Linear(4, 4)), num_members=2, rank=2, target_modules="0")


def test_headless_model_and_3d_features() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
    ensemble = LoRAEnsemble(model, num_members=4, rank=1, target_modules=["0", "2"], head=None)
    x = torch.randn(5, 2, 6)  # 3-D input, batch 5
    out = ensemble(x)
    assert out.shape == (4, 5, 2, 3)
    out.sum().backward()
    assert ensemble.model[2].lora_B.grad is not None


def test_explicit_attention_matches_torch_mha() -> None:
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=12, vdim=12).eval()
        explicit = ExplicitMultiheadAttention.from_multihead_attention(mha).eval()
        q = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
        kv = torch.randn(3, 7, 12) if batch_first else torch.randn(7, 3, 12)
        padding = torch.rand(3, 7) < 0.3
        padding[:, 0] = False
        causal = torch.rand(5, 7) < 0.2
        causal[:, 0] = False
        for need_weights in (True, False):
            want = mha(q, kv, kv, key_padding_mask=padding, attn_mask=causal, need_weights=need_weights)
            got = explicit(q, kv, kv, key_padding_mask=padding, attn_mask=causal, need_weights=need_weights)
            assert_close_named("mha out", got[0], want[0].double(), torch.float32)
            if need_weights:
                assert_close_named("mha weights", got[1], want[1].double(), torch.float32)
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    explicit = ExplicitMultiheadAttention.from_multihead_attention(mha).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():  # the fused fast path of nn.MultiheadAttention
        assert_close_named("mha fast path", explicit(x, x, x, need_weights=False)[0],
                           mha(x, x, x, need_weights=False)[0].double(), torch.float32)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    assert_close_named("mha causal", explicit(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0],
                       mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0].double(), torch.float32)
    unbatched = explicit(x[0], x[0], x[0])
    want = mha(x[0], x[0], x[0])
    assert_close_named("mha unbatched", unbatched[0], want[0].double(), torch.float32)
    assert_close_named("mha unbatched weights", unbatched[1], want[1].double(), torch.float32)
    with pytest.raises(ValueError, match="is_causal"):
        explicit(x, x, x, is_causal=True)


def test_predict_uncertainty_shapes_and_identities() -> None:
    ensemble = LoRAEnsemble(timm_vit(), num_members=3, rank=2, num_classes=NUM_CLASSES).eval()
    pred = ensemble.predict(torch.randn(4, 3, 32, 32))
    assert pred.member_probs.shape == (3, 4, NUM_CLASSES)
    assert pred.mean_probs.shape == pred.variance.shape == (4, NUM_CLASSES)
    torch.testing.assert_close(pred.mean_probs.sum(-1), torch.ones(4))
    torch.testing.assert_close(pred.predictive_entropy - pred.expected_entropy, pred.mutual_information)
    assert (pred.mutual_information > 0).all(), "independent heads should disagree"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_backends_match_torch_backend_in_a_model(backend: str) -> None:
    from lora_ensemble import available_backends
    if backend not in available_backends("cpu"):
        pytest.skip(f"backend {backend!r} does not run on the CPU here")
    original = timm_vit().eval()
    outs, grads = {}, {}
    for name in ("torch", backend):
        torch.manual_seed(1)
        ensemble = LoRAEnsemble(copy.deepcopy(original), num_members=2, rank=3, backend=name,
                                num_classes=NUM_CLASSES, share_first_input=True).eval()
        randomise_lora(ensemble)
        torch.manual_seed(2)
        out = ensemble(*image_inputs(2)[0])
        out.square().sum().backward()
        outs[name] = out
        grads[name] = {n: p.grad for n, p in ensemble.named_parameters() if p.requires_grad}
    assert_close_named(f"{backend} logits", outs[backend], outs["torch"].double(), torch.float32)
    for pname, g in grads[backend].items():
        assert_close_named(f"{backend} d{pname}", g, grads["torch"][pname].double(), torch.float32)
