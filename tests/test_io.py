"""Save -> load round trips of the members (safetensors + JSON) and export of one member."""

from __future__ import annotations

import copy
import inspect
import json
import re

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


def timm_members(tmp_path, num_members: int = 4) -> tuple[nn.Module, LoRAEnsemble]:
    """A timm ViT (eval mode) and an ensemble of it with distinct members, saved to ``tmp_path``."""
    build, _, _ = FAMILIES["timm"]
    original = build().eval()
    ensemble = LoRAEnsemble(copy.deepcopy(original), num_members=num_members, rank=2, num_classes=NUM_CLASSES).eval()
    randomise_lora(ensemble)
    save_members(ensemble, tmp_path)
    return original, ensemble


def assert_unwrapped(model: nn.Module) -> None:
    assert not any(isinstance(m, FusedLoRAEnsembleLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_load_refuses_another_base_of_the_same_shapes(tmp_path) -> None:
    from timm.models.vision_transformer import VisionTransformer
    original, ensemble = timm_members(tmp_path)
    record = json.loads((tmp_path / CONFIG_NAME).read_text())["base"]
    assert record["class"] == "timm.models.vision_transformer.VisionTransformer"
    assert record["layers"]["blocks.0.attn.qkv"]["shape"] == [96, 32]
    qkv = record["tensors"]["blocks.0.attn.qkv.weight"]
    assert qkv["shape"] == [96, 32] and qkv["dtype"] == "float32" and len(qkv["sample"]) == 8
    assert qkv["norm"] == pytest.approx(original.blocks[0].attn.qkv.weight.double().norm().item(), rel=1e-12)
    assert set(record["tensors"]) == {name for name, _ in [*original.named_parameters(), *original.named_buffers()]
                                      if not name.startswith("head.")}

    retrained = FAMILIES["timm"][0]()  # same class and shapes, other weights (a random vit_tiny vs a pretrained one)
    with pytest.raises(ValueError, match=r"the values \(fingerprint\) of base tensors of \d+ of \d+: "
                                         r"cls_token: entry \d+ of its sample"):
        load_members(retrained, tmp_path)
    assert_unwrapped(retrained)

    class OtherViT(VisionTransformer):  # same weights, another class (e.g. a DeiT built on the ViT code)
        pass
    other = OtherViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=NUM_CLASSES)
    other.load_state_dict(original.state_dict())
    with pytest.raises(ValueError, match=r"class 'timm\.models\.vision_transformer\.VisionTransformer' \(saved\) vs "
                                         r"'.*OtherViT'\. Pass strict_base=False"):
        load_members(other, tmp_path)
    assert_unwrapped(other)
    with pytest.warns(UserWarning, match="loading anyway"):
        loaded = load_members(retrained, tmp_path, strict_base=False)
    assert torch.equal(loaded.model.blocks[0].attn.qkv.lora_B, ensemble.model.blocks[0].attn.qkv.lora_B)


def test_load_into_the_base_cast_to_bfloat16(tmp_path, recwarn) -> None:
    original, ensemble = timm_members(tmp_path)
    loaded = load_members(copy.deepcopy(original).to(torch.bfloat16), tmp_path)  # bf16 rounding is no other base
    assert not recwarn.list
    assert loaded.model.blocks[0].attn.qkv.lora_A.dtype == torch.bfloat16 and not loaded.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x.bfloat16()).float(), ensemble(x), atol=0.1, rtol=0.05)


def test_files_without_a_base_record_load_with_a_warning(tmp_path) -> None:
    timm_members(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    del config["base"], config["adapter_dtype"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "format_version": 1}))
    with pytest.warns(UserWarning, match="records nothing about the base"):
        loaded = load_members(FAMILIES["timm"][0](), tmp_path)
    assert loaded.num_members == 4


def test_load_a_selection_of_members(tmp_path) -> None:
    original, ensemble = timm_members(tmp_path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = ensemble(x)
        for members, order in (([3, 0], [3, 0]), (slice(None, None, 2), [0, 2]), ([-1], [3]), (slice(1, 3), [1, 2])):
            loaded = load_members(copy.deepcopy(original), tmp_path, members=members, device="cpu")
            assert loaded.num_members == len(order) and loaded.head.weight.shape[0] == len(order)
            torch.testing.assert_close(loaded(x), expected[order], rtol=0, atol=0)
            assert_close_named("export of a loaded member", export_member(loaded, 0).eval()(x),
                               expected[order[0]].double(), torch.float32)
    model = copy.deepcopy(original)
    for members, error, message in (([0, 0], ValueError, "each once"), ([4], ValueError, r"\[4\] are outside the 4"),
                                    (slice(5, None), ValueError, "at least one"),
                                    ("0", TypeError, "slice or a sequence"),
                                    ([True], TypeError, "slice or a sequence")):
        with pytest.raises(error, match=message):
            load_members(model, tmp_path, members=members)
    assert_unwrapped(model)


def test_weight_sample_of_a_layer_without_a_floating_point_weight() -> None:
    from lora_ensemble.io import _weight_sample

    class Packed(nn.Module):  # a quantized base stores packed integers: nothing to fingerprint
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 2, dtype=torch.uint8), requires_grad=False)

    assert _weight_sample(Packed(), 4, 4) is None
    linear = nn.Linear(3, 5)
    assert _weight_sample(linear, 5, 3) == linear.weight.detach().double().flatten().tolist()  # 15 < 64: all of it


@pytest.mark.skipif("adapter_dtype" not in inspect.signature(LoRAEnsemble).parameters,
                    reason="LoRAEnsemble has no adapter_dtype yet")
def test_load_members_in_another_adapter_dtype(tmp_path) -> None:
    original, _ = timm_members(tmp_path)
    loaded = load_members(copy.deepcopy(original), tmp_path, dtype=torch.float64)
    assert loaded.adapter_dtype == torch.float64 and loaded.model.blocks[0].attn.qkv.lora_A.dtype == torch.float64
    assert loaded.model.blocks[0].attn.qkv.weight.dtype == torch.float32
    save_members(loaded, tmp_path / "again")
    assert json.loads((tmp_path / "again" / CONFIG_NAME).read_text())["adapter_dtype"] == "float64"
    assert load_members(copy.deepcopy(original), tmp_path / "again").adapter_dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_members_onto_a_gpu(tmp_path) -> None:
    original, ensemble = timm_members(tmp_path)
    loaded = load_members(copy.deepcopy(original), tmp_path, device="cuda", members=[1])
    assert all(p.is_cuda for p in loaded.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x.cuda()).cpu(), ensemble(x)[[1]], atol=1e-4, rtol=1e-4)


def _changed(original: nn.Module, names: list[str], change=torch.Tensor.normal_) -> nn.Module:
    """A copy of ``original`` with ``change`` applied in place to the tensors ``names`` (default: redrawn)."""
    other = copy.deepcopy(original)
    with torch.no_grad():
        for name in names:
            change(other.get_parameter(name))
    return other


BASE_CHANGES = {  # what differs -> (the tensors changed, how)
    "mlp-and-attention-biases": (["blocks.0.attn.qkv.bias", "blocks.0.mlp.fc1.weight", "blocks.1.mlp.fc2.weight"],
                                 torch.Tensor.normal_),
    "bitfit-biases-by-1e-3": (["blocks.0.attn.qkv.bias", "blocks.1.mlp.fc1.bias"], lambda t: t.add_(1e-3)),
    "norms": (["blocks.1.norm1.weight", "norm.bias"], torch.Tensor.normal_),
    "embeddings": (["pos_embed", "patch_embed.proj.weight"], torch.Tensor.normal_),
}


@pytest.mark.parametrize("change", list(BASE_CHANGES.values()), ids=list(BASE_CHANGES))
def test_load_refuses_a_base_whose_other_tensors_differ(tmp_path, change) -> None:
    """The wrapped layers' W0 agree, the tensors named (in model order) differ: refused, those named."""
    names, how = change
    original, ensemble = timm_members(tmp_path)
    other = _changed(original, names, how)
    listed = ": .*; ".join(re.escape(name) for name in names)
    with pytest.raises(ValueError, match=rf"the values \(fingerprint\) of base tensors of {len(names)} of \d+: "
                                         rf"{listed}: .*Pass strict_base=False"):
        load_members(other, tmp_path)
    assert_unwrapped(other)
    with pytest.warns(UserWarning, match=rf"{re.escape(names[0])}.*loading anyway"):
        loaded = load_members(other, tmp_path, strict_base=False)
    assert torch.equal(loaded.model.blocks[0].attn.qkv.lora_B, ensemble.model.blocks[0].attn.qkv.lora_B)


def test_load_refuses_a_base_with_other_buffers_or_tensors(tmp_path) -> None:
    original, _ = timm_members(tmp_path)
    other = copy.deepcopy(original)
    other.register_buffer("extra", torch.zeros(3))
    with pytest.raises(ValueError, match=r"base tensors the saved base lacked of 1 of \d+: extra"):
        load_members(other, tmp_path)
    assert_unwrapped(other)


def test_format_2_files_check_the_wrapped_weights_with_a_warning(tmp_path) -> None:
    """Files of format 2 recorded 64 entries of each wrapped W0 only: still checked, with a warning that the
    rest of the base cannot be."""
    from lora_ensemble.io import _weight_sample

    original, _ = timm_members(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    del config["base"]["tensors"]
    for name, layer in config["base"]["layers"].items():
        layer["sample"] = _weight_sample(original.get_submodule(name), *layer["shape"])
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "format_version": 2}))
    with pytest.warns(UserWarning, match="records only the wrapped layers' W0"):
        assert load_members(copy.deepcopy(original), tmp_path).num_members == 4
    with pytest.raises(ValueError, match=r"the weights W0 \(fingerprint\) of wrapped layers of 1 of 4: blocks\.1"):
        with pytest.warns(UserWarning, match="records only"):
            load_members(_changed(original, ["blocks.1.attn.qkv.weight"]), tmp_path)


def _edit_config(tmp_path, edit) -> None:
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    edited = edit(config)
    text = edited if isinstance(edited, str) else json.dumps(config if edited is None else edited)
    (tmp_path / CONFIG_NAME).write_text(text)


DAMAGED_CONFIGS = {
    "num_members-missing": (lambda c: c.pop("num_members") and None, r"num_members is missing"),
    "rank-missing": (lambda c: c.pop("rank") and None, r"rank is missing"),
    "target_modules-missing": (lambda c: c.pop("target_modules") and None, r"target_modules is missing"),
    "base.class-missing": (lambda c: c["base"].pop("class") and None, r"base\.class is missing"),
    "target_modules-shortened": (lambda c: c.update(target_modules=c["target_modules"][1:]),
                                 r"base\.layers and target_modules name different layers \(\['blocks\.0\.attn\.qkv"),
    "base.layers-extra": (lambda c: c["base"]["layers"].update({"blocks.9.attn.qkv": {"shape": [1, 1]}}),
                          r"base\.layers and target_modules name different layers \(\['blocks\.9\.attn\.qkv"),
    "json-list": (lambda c: [c], r"must hold a JSON object, got a list"),
    "not-json": (lambda c: "{num_members: 3", r"is not valid JSON"),
    "num_members-str": (lambda c: c.update(num_members="3"), r"num_members must be an int, got '3'"),
    "num_members-zero": (lambda c: c.update(num_members=0), r"num_members must be a positive int, got 0"),
    "head-str": (lambda c: c.update(head="head"), r"head must be a list of strings, got 'head'"),
    "adapter_dtype-unknown": (lambda c: c.update(adapter_dtype="float99"), r"adapter_dtype 'float99' names no"),
    "base.tensors-entry": (lambda c: c["base"]["tensors"].update(pos_embed=[1]), r"base\.tensors\.pos_embed must"),
}


@pytest.mark.parametrize("damage", list(DAMAGED_CONFIGS.values()), ids=list(DAMAGED_CONFIGS))
def test_damaged_config_is_an_error_naming_the_file_and_the_key(tmp_path, damage) -> None:
    edit, message = damage
    original, _ = timm_members(tmp_path)
    _edit_config(tmp_path, edit)
    model = copy.deepcopy(original)
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / CONFIG_NAME))}.*{message}"):
        load_members(model, tmp_path)
    assert_unwrapped(model)


@pytest.mark.parametrize("content", ["truncated", "random", "pickle", "empty"])
def test_damaged_weights_are_an_error_naming_the_file(tmp_path, content: str) -> None:
    import os
    import pickle

    original, _ = timm_members(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "random": os.urandom(500),
                      "pickle": pickle.dumps({"a": 1}), "empty": b""}[content])
    model = copy.deepcopy(original)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is not a readable safetensors file"):
        load_members(model, tmp_path)
    assert_unwrapped(model)
