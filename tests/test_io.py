"""Save -> load round trips of the members (safetensors + JSON) and export of one member."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lora_ensemble import FusedLoRAEnsembleLinear, LoRAEnsemble
from lora_ensemble.io import CONFIG_NAME, WEIGHTS_NAME, export_member, load_members, save_members

from .test_ensemble import FAMILIES, NUM_CLASSES, logits_of, randomise_lora
from .utils import assert_close_named


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_gives_identical_predictions(family: str, tmp_path) -> None:
    build, inputs, trunk = FAMILIES[family]
    original = build().eval()
    ensemble = LoRAEnsemble(copy.deepcopy(original), num_members=3, rank=2, num_classes=NUM_CLASSES, alpha=2.0,
                            replicate_at=trunk).eval()
    randomise_lora(ensemble)
    save_members(ensemble, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["num_members"] == 3 and config["target_modules"] == ensemble.target_names
    loaded = load_members(copy.deepcopy(original), tmp_path).eval()
    args, kwargs = inputs(4)
    with torch.no_grad():
        assert torch.equal(loaded(*args, **kwargs), ensemble(*args, **kwargs))
    assert loaded.replicate_at == trunk and loaded.alpha == 2.0


def test_saved_file_holds_only_member_parameters(tmp_path) -> None:
    from safetensors.torch import load_file
    build, _, _ = FAMILIES["timm"]
    ensemble = LoRAEnsemble(build(), num_members=2, rank=4)
    save_members(ensemble, tmp_path)
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    lora = {f"{name}.lora_{ab}" for name in ensemble.target_names for ab in "AB"}
    assert set(saved) == lora | {"head.weight", "head.bias"}
    assert saved["blocks.0.attn.qkv.lora_A"].shape == (2, 4, 32)
    assert saved["head.weight"].shape == (2, NUM_CLASSES, 32)


def test_load_rejects_a_different_backbone(tmp_path) -> None:
    build, _, _ = FAMILIES["timm"]
    save_members(LoRAEnsemble(build(), num_members=2, rank=2), tmp_path)
    from timm.models.vision_transformer import VisionTransformer
    shallower = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                  num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv"):
        load_members(shallower, tmp_path)
    with pytest.raises(ValueError, match="head"):
        load_members(nn.Sequential(nn.Linear(4, 4)), tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_member_is_a_plain_model_equal_to_that_member(family: str) -> None:
    build, inputs, trunk = FAMILIES[family]
    ensemble = LoRAEnsemble(build().eval(), num_members=3, rank=2, num_classes=NUM_CLASSES,
                            replicate_at=trunk, share_first_input=True).eval()
    randomise_lora(ensemble)
    args, kwargs = inputs(2)
    with torch.no_grad():
        out = ensemble(*args, **kwargs)
        for member in (0, 2):
            plain = export_member(ensemble, member).eval()
            assert not any(isinstance(m, FusedLoRAEnsembleLinear) for m in plain.modules())
            assert_close_named(f"{family} export {member}", logits_of(plain(*args, **kwargs)), out[member].double(),
                               torch.float32)
    shared = {p.data_ptr() for p in ensemble.parameters()}
    assert not shared & {p.data_ptr() for p in plain.parameters()}, "the export must not share storage"
    with torch.no_grad():  # the ensemble's hooks are still in place and still work
        torch.testing.assert_close(ensemble(*args, **kwargs), out)
