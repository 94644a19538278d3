"""peft adapters -> LoRAEnsemble -> peft adapters, against peft itself (float64): member n of
``load_peft_adapters`` equals ``PeftModel.from_pretrained(base, dir_n)``, and each folder of
``save_peft_adapters`` loaded by peft equals member n; peft's target / pattern / modules_to_save rules;
errors name the folder and the module and leave the model as it was."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_ensemble import EnsembleHead, FusedLoRAEnsembleLinear, LoRAEnsemble, PerMemberModule
from lora_ensemble.io import export_member, load_members, load_peft_adapters, save_members, save_peft_adapters
from lora_ensemble.peft_format import PREFIX, _heads, _is_target, _pattern_value

from .hf_tiny import VOCAB, causal_lm, classifier, classifier_inputs

peft = pytest.importorskip("peft")

LLAMA_TARGETS = ["q_proj", "v_proj"]


def make_adapters(base: nn.Module, configs: list, root: Path, **save_options) -> list[str]:
    """One peft adapter per config on a copy of ``base``, every trainable parameter (LoRA factors,
    ``modules_to_save`` copies) moved off its init, saved with ``save_pretrained``."""
    dirs = []
    for n, config in enumerate(configs):
        model = peft.get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.3)
        model.save_pretrained(root / f"adapter_{n}", **save_options)
        dirs.append(str(root / f"adapter_{n}"))
    return dirs


def peft_outputs(base: nn.Module, folder: str, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()(**inputs).logits


def assert_members_are_the_adapters(ensemble: LoRAEnsemble, base: nn.Module, dirs: list[str], inputs: dict) -> None:
    with torch.no_grad():
        out = ensemble(**inputs)
    assert out.shape[0] == len(dirs)
    for n, folder in enumerate(dirs):
        torch.testing.assert_close(out[n], peft_outputs(base, folder, inputs), rtol=1e-10, atol=1e-10,
                                   msg=lambda m, n=n, folder=folder: f"member {n} vs {folder}: {m}")
    assert not torch.allclose(out[0], out[1])


def test_llama_adapters_with_different_alphas_patterns_and_rslora_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    base = causal_lm("llama")
    configs = [
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=LLAMA_TARGETS, lora_dropout=0.1),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=LLAMA_TARGETS, lora_dropout=0.1),
        peft.LoraConfig(r=2, lora_alpha=8, target_modules=LLAMA_TARGETS, alpha_pattern={"layers.1.self_attn.v_proj": 3},
                        lora_dropout=0.1),
        peft.LoraConfig(r=2, lora_alpha=5, target_modules=LLAMA_TARGETS, use_rslora=True, lora_dropout=0.1),
    ]
    dirs = make_adapters(base, configs, tmp_path)
    ensemble = load_peft_adapters(copy.deepcopy(base), dirs, backend="torch")
    assert ensemble.alpha == 4 and ensemble.rank == 2 and ensemble.lora_dropout == 0.1 and not ensemble.use_rslora
    assert sorted({name.rsplit(".", 1)[1] for name in ensemble.target_names}) == LLAMA_TARGETS
    inputs = {"input_ids": torch.randint(3, VOCAB, (2, 5))}
    assert_members_are_the_adapters(ensemble, base, dirs, inputs)
    # Adapters with adapter 0's alpha are copied as they are; others have their scaling folded into lora_B.
    from safetensors.torch import load_file
    saved = load_file(f"{dirs[1]}/adapter_model.safetensors")
    layer = ensemble.model.get_submodule("model.layers.1.self_attn.v_proj")
    assert torch.equal(layer.lora_B[1], saved["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"])
    torch.testing.assert_close(layer.lora_B[2] * layer.scaling, load_file(f"{dirs[2]}/adapter_model.safetensors")[
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"] * 3 / 2)

    folders = save_peft_adapters(ensemble, tmp_path / "out")
    assert [Path(f).name for f in folders] == ["member_0", "member_1", "member_2", "member_3"]
    config = json.loads((Path(folders[2]) / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 4 and config["target_modules"] == ensemble.target_names
    assert_members_are_the_adapters(ensemble, base, folders, inputs)  # ensemble -> peft
    again = load_peft_adapters(copy.deepcopy(base), folders, backend="torch")  # -> ensemble again
    for (name, p), q in zip(ensemble.member_parameters().items(), again.member_parameters().values()):
        assert torch.equal(p, q), name


def test_gpt2_conv1d_regex_targets_and_export_member(tmp_path) -> None:
    torch.manual_seed(1)
    base = causal_lm("gpt2")
    targets = r".*\.h\.\d+\.(attn\.c_attn|mlp\.c_fc)"  # a regex: peft matches it against the full name
    dirs = make_adapters(base, [peft.LoraConfig(r=3, lora_alpha=a, target_modules=targets) for a in (6, 2)], tmp_path)
    ensemble = load_peft_adapters(copy.deepcopy(base), dirs, backend="torch")
    assert ensemble.target_names == [f"transformer.h.{i}.{name}"
                                     for i in range(2) for name in ("attn.c_attn", "mlp.c_fc")]
    assert all(layer.fan_in_fan_out for layer in ensemble.lora_layers().values())
    inputs = {"input_ids": torch.randint(3, VOCAB, (2, 6))}
    assert_members_are_the_adapters(ensemble, base, dirs, inputs)
    with torch.no_grad():
        for n in range(2):  # export_member still gives member n (its lora_B folds alpha 2 / 6 for member 1)
            torch.testing.assert_close(export_member(ensemble, n).eval()(**inputs).logits,
                                       peft_outputs(base, dirs[n], inputs), rtol=1e-10, atol=1e-10)
    assert_members_are_the_adapters(ensemble, base, save_peft_adapters(ensemble, tmp_path / "out"), inputs)


@pytest.mark.parametrize("family", ["roberta", "vit"])
def test_classifier_modules_to_save_become_per_member_heads(family: str, tmp_path) -> None:
    torch.manual_seed(2)
    base = classifier(family)
    has_q_proj = any(n.endswith(".q_proj") for n, _ in base.named_modules())
    targets = ["q_proj", "v_proj"] if has_q_proj else ["query", "value"]
    # RoBERTa as SEQ_CLS: peft adds modules_to_save ["classifier", "score"] itself.
    options = {"task_type": "SEQ_CLS"} if family == "roberta" else {"modules_to_save": ["classifier"]}
    dirs = make_adapters(base, [peft.LoraConfig(r=2, lora_alpha=a, target_modules=targets, **options)
                                      for a in (2, 4, 8)], tmp_path)
    ensemble = load_peft_adapters(copy.deepcopy(base), dirs, backend="torch")
    assert list(ensemble.heads) == ["classifier"]
    assert isinstance(ensemble.head, PerMemberModule if family == "roberta" else EnsembleHead)
    inputs = classifier_inputs(family, 3)
    assert_members_are_the_adapters(ensemble, base, dirs, inputs)
    folders = save_peft_adapters(ensemble, tmp_path / "out")
    assert json.loads((Path(folders[0]) / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    assert_members_are_the_adapters(ensemble, base, folders, inputs)
    save_members(ensemble, tmp_path / "members")  # and through the ensemble's own format
    assert_members_are_the_adapters(load_members(copy.deepcopy(base), tmp_path / "members"), base, dirs, inputs)


def test_pickled_adapter_weights_load_too(tmp_path) -> None:
    torch.manual_seed(3)
    base = causal_lm("llama")
    dirs = make_adapters(base, [peft.LoraConfig(r=2, target_modules=LLAMA_TARGETS)] * 2, tmp_path,
                         safe_serialization=False)
    assert (Path(dirs[0]) / "adapter_model.bin").is_file()
    assert_members_are_the_adapters(load_peft_adapters(copy.deepcopy(base), dirs, backend="torch"), base, dirs,
                                    {"input_ids": torch.randint(3, VOCAB, (1, 4))})


def test_target_pattern_and_head_rules_are_peft_s() -> None:
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    llama, roberta = causal_lm("llama"), classifier("roberta")
    configs = [
        (llama, peft.LoraConfig(target_modules=["q_proj", "self_attn.o_proj", "mlp.up_proj"])),
        (llama, peft.LoraConfig(target_modules=r".*layers\.1\.(self_attn|mlp)\.[qd]\w*_proj")),
        (llama, peft.LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["layers.0.self_attn.q_proj"])),
        (llama, peft.LoraConfig(target_modules=["q_proj", "v_proj"], exclude_modules=r".*\.1\..*")),
        (llama, peft.LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
        (llama, peft.LoraConfig(target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers")),
        (roberta, peft.LoraConfig(target_modules=["query", "dense"], modules_to_save=["classifier"])),
    ]
    for model, config in configs:
        as_saved = json.loads(json.dumps(config.to_dict(), default=sorted))
        chosen = [name for name, _ in model.named_modules() if _is_target(as_saved, name)]
        assert chosen and chosen == [name for name, _ in model.named_modules()
                                     if check_target_module_exists(config, name)], config
    patterns = {"layers.0.self_attn.q_proj": 1, "v_proj": 2, r"layers\.1\..*": 3}
    for name, _ in llama.named_modules():
        assert _pattern_value(patterns, name, 0) == patterns.get(get_pattern_key(patterns.keys(), name), 0), name
    # modules_to_save: peft <= 0.21 wraps and saves every module whose name ends with an entry (DeiT: both
    # classifiers, cls_classifier and distillation_classifier, for "classifier"), peft >= 0.22 those named
    # an entry or ending with "." + entry (DeiT: none); the heads read are those the installed peft saved.
    deit = classifier("deit")
    for model, config in ((roberta, peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query"])),
                          (deit, peft.LoraConfig(target_modules=["q_proj"], modules_to_save=["classifier"]))):
        peft_model = peft.get_peft_model(copy.deepcopy(model), config)
        expected = [name for name, m in peft_model.base_model.model.named_modules()
                    if isinstance(m, peft.utils.ModulesToSaveWrapper)]
        saved = set(peft.get_peft_model_state_dict(peft_model))
        as_saved = json.loads(json.dumps(config.to_dict(), default=sorted))
        assert _heads(as_saved, dict(model.named_modules()), saved) == expected, peft.__version__


def test_heads_of_adapters_saved_by_either_peft_rule() -> None:
    """An adapter of DeiT with modules_to_save=["classifier"]: saved by peft <= 0.21 it holds
    cls_classifier and distillation_classifier (name suffixes), which are read; by peft >= 0.22 none,
    and none is asked for. A module named exactly an entry is a head whether or not it was saved (its
    tensors missing are then the adapter's error)."""
    deit = dict(classifier("deit").named_modules())
    config = {"modules_to_save": ["classifier"]}
    old_peft = {f"{PREFIX}{name}.{p}" for name in ("cls_classifier", "distillation_classifier")
                for p, _ in deit[name].named_parameters()}
    assert _heads(config, deit, old_peft) == ["cls_classifier", "distillation_classifier"]
    assert _heads(config, deit, set()) == []
    assert _heads({"modules_to_save": ["cls_classifier"]}, deit, set()) == ["cls_classifier"]


def assert_untouched(model: nn.Module, reference: nn.Module) -> None:
    assert not any(isinstance(m, FusedLoRAEnsembleLinear) for m in model.modules())
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in reference.parameters()]
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_bad_adapters_are_errors_naming_folder_and_module(tmp_path) -> None:
    torch.manual_seed(4)
    base = causal_lm("llama")
    good = make_adapters(base, [peft.LoraConfig(r=2, target_modules=LLAMA_TARGETS)], tmp_path / "good")[0]

    def adapter(name: str, **options) -> str:
        return make_adapters(base, [peft.LoraConfig(**options)], tmp_path / name)[0]

    model = copy.deepcopy(base)
    cases = [
        ([good, adapter("fewer", r=2, target_modules=["q_proj"])],
         r"adapter_0 targets module model\.layers\.0\.self_attn\.v_proj and adapter .*fewer/adapter_0 does not"),
        ([good, adapter("rank", r=4, target_modules=LLAMA_TARGETS)], r"rank 4 \(module model\.layers\.0\.self_attn"),
        ([adapter("pattern", r=2, target_modules=LLAMA_TARGETS, rank_pattern={"layers.1.self_attn.v_proj": 4})],
         r"module model\.layers\.1\.self_attn\.v_proj has rank 4 and "
         r"module model\.layers\.0\.self_attn\.q_proj rank 2"),
        ([adapter("dora", r=2, target_modules=LLAMA_TARGETS, use_dora=True)], r"dora/adapter_0: use_dora=True"),
        ([adapter("embedding", r=2, target_modules=["q_proj", "embed_tokens"])],
         r"target model\.embed_tokens is a Embedding"),
        ([good, str(tmp_path / "missing")], r"missing: no adapter_config\.json"),
    ]
    for dirs, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            load_peft_adapters(model, dirs)
        assert_untouched(model, base)
    with pytest.raises(TypeError, match="non-empty list"):
        load_peft_adapters(model, good)
    with pytest.raises(TypeError, match=r"\['alpha'\]"):
        load_peft_adapters(model, [good], alpha=2)
    with pytest.raises(ValueError, match="lora_dropout must be"):  # LoRAEnsemble's own error
        load_peft_adapters(model, [good], lora_dropout=2.0)
    assert_untouched(model, base)
    config_file = Path(good) / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "lora_dropout": 0.2}))
    with pytest.warns(UserWarning, match=r"lora_dropout differ \(\[0\.0, 0\.2\]\)"):
        assert load_peft_adapters(model, [good, adapter("d", r=2, target_modules=LLAMA_TARGETS)]).lora_dropout == 0.2


def test_save_refuses_converted_multihead_attention(tmp_path) -> None:
    from torchvision.models import VisionTransformer
    vit = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=8)
    with pytest.raises(ValueError, match="ExplicitMultiheadAttention"):
        save_peft_adapters(LoRAEnsemble(vit, 2, 2), tmp_path)


def test_adapters_with_a_rank_above_a_layer_size_load_exactly(tmp_path) -> None:
    """peft saves a rank above min(in_features, out_features) (v_proj is [16, 32] here, r = 20); loading one
    reproduces it, where a fresh LoRAEnsemble with that rank is refused."""
    torch.manual_seed(6)
    base = causal_lm("llama")
    v_proj = base.get_submodule("model.layers.0.self_attn.v_proj")
    rank = min(v_proj.in_features, v_proj.out_features) + 4
    dirs = make_adapters(base, [peft.LoraConfig(r=rank, target_modules=LLAMA_TARGETS)] * 2, tmp_path)
    with pytest.raises(ValueError, match=rf"target model\.layers\.0\.self_attn\.v_proj: rank {rank} is above"):
        LoRAEnsemble(copy.deepcopy(base), num_members=2, rank=rank, target_modules=LLAMA_TARGETS)
    ensemble = load_peft_adapters(copy.deepcopy(base), dirs, backend="torch")
    assert ensemble.rank == rank
    assert_members_are_the_adapters(ensemble, base, dirs, {"input_ids": torch.randint(3, VOCAB, (2, 5))})
    save_members(ensemble, tmp_path / "members")
    again = load_members(copy.deepcopy(base), tmp_path / "members", backend="torch")
    for (name, p), q in zip(ensemble.member_parameters().items(), again.member_parameters().values()):
        assert torch.equal(p, q), name


DAMAGED_ADAPTER_CONFIGS = {
    "r-str": ({"r": "4"}, r"r must be an int, got '4'"),
    "r-zero": ({"r": 0}, r"r must be a positive int, got 0"),
    "lora_alpha-str": ({"lora_alpha": "8"}, r"lora_alpha must be a number, got '8'"),
    "target_modules-int": ({"target_modules": 5}, r"target_modules must be a string or a list of strings, got 5"),
    "lora_dropout-str": ({"lora_dropout": "x"}, r"lora_dropout must be a number, got 'x'"),
    "modules_to_save-str": ({"modules_to_save": "lm_head"},
                            r"modules_to_save must be a list of strings or null, got 'lm_head'"),
    "rank_pattern-value": ({"rank_pattern": {"v_proj": "2"}}, r"rank_pattern\.v_proj must be an int, got '2'"),
    "use_rslora-str": ({"use_rslora": "yes"}, r"use_rslora must be true/false, got 'yes'"),
}


@pytest.mark.parametrize("change", list(DAMAGED_ADAPTER_CONFIGS.values()), ids=list(DAMAGED_ADAPTER_CONFIGS))
def test_damaged_adapter_config_is_an_error_naming_the_file_and_the_key(tmp_path, change) -> None:
    update, message = change
    torch.manual_seed(5)
    base = causal_lm("llama")
    folder = make_adapters(base, [peft.LoraConfig(r=2, target_modules=LLAMA_TARGETS)], tmp_path)[0]
    path = Path(folder) / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **update}))
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: {message}"):
        load_peft_adapters(model, [folder])
    assert_untouched(model, base)


@pytest.mark.parametrize("damage", ["not-json", "json-list", "truncated-weights", "random-weights",
                                    "pickled-object-as-bin"])
def test_damaged_adapter_files_are_errors_naming_the_file(tmp_path, damage: str) -> None:
    import os
    import pickle

    torch.manual_seed(5)
    base = causal_lm("llama")
    folder = Path(make_adapters(base, [peft.LoraConfig(r=2, target_modules=LLAMA_TARGETS)], tmp_path)[0])
    config, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if damage == "not-json":
        config.write_text("{'r': 2")
        path, message = config, "is not valid JSON"
    elif damage == "json-list":
        config.write_text("[]")
        path, message = config, "must hold a JSON object, got a list"
    elif damage in ("truncated-weights", "random-weights"):
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2] if damage == "truncated-weights" else os.urandom(400))
        path, message = weights, "is not a readable safetensors file"
    else:  # an adapter_model.bin that holds something other than tensors: refused by weights_only, not run
        weights.unlink()
        path = folder / "adapter_model.bin"
        path.write_bytes(pickle.dumps(os.getcwd))
        message = "is not a readable torch.save file of tensors"
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:? {message}"):
        load_peft_adapters(model, [str(folder)])
    assert_untouched(model, base)
