"""LLM path of LoRAEnsemble and the LoRA options: the HF output (loss, cache), multiple-choice
``predict`` against peft, member chunks, ``lora_dropout`` / rsLoRA / peft init against peft, HF
``Conv1D`` bases, per-member module heads, eval mode, and errors (a failed wrap changes nothing)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_ensemble import FusedLoRAEnsembleLinear, LoRAEnsemble, PerMemberModule, available_backends, replicate_members
from lora_ensemble.generation import cache_of
from lora_ensemble.targets import resolve_target_modules

from .hf_tiny import VOCAB, causal_lm, classifier, classifier_inputs, left_padded, peft_copy, peft_member, randomise

peft = pytest.importorskip("peft")


def lm_ensemble(family: str = "llama", num_members: int = 3, **options) -> tuple[nn.Module, LoRAEnsemble]:
    torch.manual_seed(0)
    original = causal_lm(family)
    ensemble = LoRAEnsemble(copy.deepcopy(original), num_members=num_members, rank=2, backend="torch", **options)
    randomise(ensemble)
    return original, ensemble


def test_forward_hf_loss_is_the_mean_of_member_losses_and_cache_is_stacked() -> None:
    original, ensemble = lm_ensemble(num_members=3)
    reference = peft_copy(original, ensemble)
    ids = torch.randint(3, VOCAB, (2, 6))
    labels = ids.clone()
    labels[0, :2] = -100
    out = ensemble.forward_hf(ids, labels=labels)
    assert out.logits.shape == (3, 2, 6, VOCAB)
    with torch.no_grad():
        losses = [peft_member(reference, n)(input_ids=ids, labels=labels).loss for n in range(3)]
    # HF computes causal-LM losses in float32 (ForCausalLMLoss upcasts with .float(), which casts these
    # float64 logits down), here over 27 stacked tokens against a mean of three 9-token means: the two
    # reductions agree to float32 rounding (a few ulps of the sum), not to float64's 1e-10.
    torch.testing.assert_close(out.loss, torch.stack(losses).mean(), rtol=1e-6, atol=1e-6)
    cache = cache_of(out)  # `cache` from transformers 5.2x, `past_key_values` before
    assert cache.get_seq_length() == 6
    keys = cache.layers[0].keys
    assert keys.shape[0] == 3 * 2  # the stacked batch, member-major
    out.loss.backward()
    assert all(layer.lora_B.grad is not None for layer in ensemble.lora_layers().values())
    ensemble.member_chunk_size = 2
    chunked = ensemble.forward_hf(ids, labels=labels)
    torch.testing.assert_close(chunked.loss, out.loss, rtol=1e-6, atol=1e-6)  # float32 losses, as above
    torch.testing.assert_close(chunked.logits, out.logits, rtol=1e-10, atol=1e-10)
    with pytest.raises(TypeError, match="ModelOutput"):
        LoRAEnsemble(nn.Sequential(nn.Linear(4, 4)), 2, 1, target_modules="0", head=None).forward_hf(torch.randn(2, 4))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("padding", ["left", "right", "none"])
def test_predict_answer_tokens_equals_peft(family: str, padding: str) -> None:
    original, ensemble = lm_ensemble(family, num_members=3)
    reference = peft_copy(original, ensemble)
    ids, mask = left_padded(3, 7, [2, 0, 5] if padding != "none" else [0, 0, 0])
    if padding == "right":
        ids, mask = ids.flip(1), mask.flip(1)
    answers = [7, 9, 11, 13]
    ensemble.train()
    pred = ensemble.predict(ids, attention_mask=mask, answer_token_ids=answers)
    assert ensemble.training and all(m.training for m in ensemble.modules())  # mode restored
    assert pred.member_probs.shape == (3, 3, 4) and pred.mutual_information.shape == (3,)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
    with torch.no_grad():
        for n in range(3):
            logits = peft_member(reference, n)(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            probs = logits[torch.arange(3), last][:, answers].softmax(-1)
            torch.testing.assert_close(pred.member_probs[n], probs.float(), rtol=1e-6, atol=1e-7)
    ensemble.member_chunk_size = 1
    chunked = ensemble.predict(ids, attention_mask=mask, answer_token_ids=torch.tensor(answers))
    torch.testing.assert_close(chunked.member_probs, pred.member_probs)
    torch.testing.assert_close(chunked.mutual_information, pred.mutual_information)


def test_predict_errors_name_the_argument() -> None:
    _, ensemble = lm_ensemble(num_members=2)
    ids = torch.randint(3, VOCAB, (2, 4))
    with pytest.raises(ValueError, match=r"answer_token_ids must be in \[0, 64\)"):
        ensemble.predict(ids, answer_token_ids=[3, VOCAB])
    with pytest.raises(ValueError, match="at least one"):
        ensemble.predict(ids, answer_token_ids=[])
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        ensemble.predict(ids, attention_mask=torch.ones(2, 3), answer_token_ids=[3])
    with pytest.raises(ValueError, match="at least one 1"):
        ensemble.predict(ids, attention_mask=torch.zeros(2, 4), answer_token_ids=[3])
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor \[B, T\]"):
        ensemble.predict(ids[0], answer_token_ids=[3])


def test_member_chunks_give_the_same_forward_and_gradients() -> None:
    torch.manual_seed(0)
    original = classifier("roberta")
    results = {}
    for chunk in (None, 2):
        torch.manual_seed(1)
        ensemble = LoRAEnsemble(copy.deepcopy(original), num_members=5, rank=2, backend="torch",
                                member_chunk_size=chunk, share_first_input=True)
        randomise(ensemble)
        out = ensemble(**classifier_inputs("roberta", 2))
        out.square().sum().backward()
        results[chunk] = (out, {n: p.grad for n, p in ensemble.named_parameters() if p.requires_grad})
    torch.testing.assert_close(results[2][0], results[None][0], rtol=1e-10, atol=1e-12)
    for name, grad in results[None][1].items():
        torch.testing.assert_close(results[2][1][name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_select_members_slices_module_heads_too() -> None:
    torch.manual_seed(0)
    ensemble = LoRAEnsemble(classifier("roberta"), num_members=4, rank=2, backend="torch")
    randomise(ensemble)
    inputs = classifier_inputs("roberta", 2)
    with torch.no_grad():
        full = ensemble(**inputs)
        kept = ensemble.select_members_(slice(1, 3))(**inputs)
    torch.testing.assert_close(kept, full[1:3], rtol=1e-10, atol=1e-12)
    assert ensemble.head.num_members == 2 and ensemble.head.module.out_proj.weight.shape[0] == 2


def test_direct_call_with_an_unreplicated_batch_is_an_error() -> None:
    _, ensemble = lm_ensemble(num_members=3)
    ids = torch.randint(3, VOCAB, (2, 4))
    with pytest.raises(ValueError, match="called directly with a batch of 2.*num_members=3"):
        ensemble.model(ids)
    with pytest.raises(ValueError, match="called directly"):
        ensemble.model.generate(ids, max_new_tokens=2)
    stacked = ensemble.model(replicate_members(ids, 3)).logits  # a stacked batch is what the model takes
    torch.testing.assert_close(stacked.view(3, 2, 4, VOCAB), ensemble(ids))


def test_failed_wrap_leaves_the_model_unmodified() -> None:
    torch.manual_seed(0)
    model = classifier("roberta")
    before = dict(model.named_modules())
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="'nope' matches no"):
        LoRAEnsemble(model, num_members=2, rank=2, target_modules=["query", "nope"])
    assert dict(model.named_modules()) == before
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    with pytest.raises(ValueError, match="init must be one of"):
        LoRAEnsemble(model, 2, 2, init="xavier")
    with pytest.raises(ValueError, match="use_rslora"):
        LoRAEnsemble(model, 2, 2, use_rslora=True)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoRAEnsemble(model, 2, 2, lora_dropout=1.0)
    with pytest.raises(ValueError, match="member_chunk_size"):
        LoRAEnsemble(model, 2, 2, member_chunk_size=0)
    with pytest.raises(ValueError, match="num_classes needs a head"):
        LoRAEnsemble(causal_lm("llama"), 2, 2, num_classes=3)
    hooks = dict(model._forward_pre_hooks)
    with pytest.raises(ValueError, match="replicate_at='nope' names no submodule"):
        LoRAEnsemble(model, 2, 2, replicate_at="nope")
    assert dict(model.named_modules()) == before and dict(model._forward_pre_hooks) == hooks


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_the_wrapped_layers_and_heads_take_the_models_mode(training: bool) -> None:
    model = classifier("roberta").train(training)
    ensemble = LoRAEnsemble(model, num_members=2, rank=2, lora_dropout=0.5)
    assert all(module.training == training for module in ensemble.model.modules())


def test_lora_dropout_rslora_and_peft_init_match_peft() -> None:
    torch.manual_seed(0)
    original = causal_lm("gpt2")
    ensemble = LoRAEnsemble(copy.deepcopy(original), num_members=1, rank=4, alpha=3.0, use_rslora=True,
                            lora_dropout=0.3, backend="torch")
    layer = next(iter(ensemble.lora_layers().values()))
    assert layer.scaling == 3.0 / math.sqrt(4) and ensemble.init == "peft"
    bound = 1 / math.sqrt(layer.in_features)  # Kaiming-uniform, a=sqrt(5)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    randomise(ensemble)
    reference = peft_copy(original, ensemble).train()
    ensemble.train()
    ids = torch.randint(3, VOCAB, (2, 5))
    torch.manual_seed(5)
    ours = ensemble(ids)[0]
    torch.manual_seed(5)
    theirs = reference(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)  # same dropout masks, same draws
    ours.square().sum().backward()
    theirs.square().sum().backward()
    inner = reference.base_model.model
    for name, layer in ensemble.lora_layers().items():
        torch.testing.assert_close(layer.lora_A.grad[0], inner.get_submodule(name).lora_A["m0"].weight.grad)
        torch.testing.assert_close(layer.lora_B.grad[0], inner.get_submodule(name).lora_B["m0"].weight.grad)
    ensemble.eval()
    torch.testing.assert_close(ensemble(ids)[0], reference.eval()(input_ids=ids).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shared", [False, True])
def test_lora_dropout_layer_against_the_formula(shared: bool) -> None:
    torch.manual_seed(0)
    layer = FusedLoRAEnsembleLinear(6, 5, num_members=3, rank=2, alpha=4.0, lora_dropout=0.5, backend="torch",
                                    dtype=torch.float64)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2 if shared else 6, 4, 6, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    y = layer(x, shared_input=shared)
    y.square().sum().backward()
    torch.manual_seed(3)
    stacked = replicate_members(x, 3) if shared else x
    dropped = F.dropout(stacked, 0.5).view(3, -1, 6)
    delta = torch.einsum("nmd,nrd,nkr->nmk", dropped, layer.lora_A, layer.lora_B).reshape(6, 4, 5)
    expected = F.linear(stacked, layer.weight, layer.bias) + 2.0 * delta
    torch.testing.assert_close(y, expected)
    grads = torch.autograd.grad(expected.square().sum(), [x, layer.lora_A, layer.lora_B])
    for got, want in zip((x.grad, layer.lora_A.grad, layer.lora_B.grad), grads, strict=True):
        torch.testing.assert_close(got, want)
    members = y.view(3, -1, 4, 5)
    assert not torch.allclose(members[0], members[1])  # a mask per member
    layer.eval()
    torch.testing.assert_close(layer(x, shared_input=shared), F.linear(stacked, layer.weight, layer.bias) + 2.0 *
                               torch.einsum("nmd,nrd,nkr->nmk", stacked.view(3, -1, 6), layer.lora_A,
                                            layer.lora_B).reshape(6, 4, 5))


def test_conv1d_base_is_shared_and_exported_as_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(5, 7).double()
    layer = FusedLoRAEnsembleLinear.from_linear(conv, num_members=2, rank=3, alpha=6.0, backend="torch")
    assert layer.weight is conv.weight and layer.bias is conv.bias and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (7, 5) and layer.lora_A.shape == (2, 3, 7)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    y = layer(replicate_members(x, 2)).view(2, 2, 3, 5)
    for n in range(2):
        merged = layer.merged_member(n)
        assert isinstance(merged, Conv1D)
        expected = conv(x) + 2.0 * x @ layer.lora_A[n].T @ layer.lora_B[n].T
        torch.testing.assert_close(y[n], expected)
        torch.testing.assert_close(merged(x), expected.detach())
    with pytest.raises(TypeError, match="nn.Linear or transformers' Conv1D"):
        FusedLoRAEnsembleLinear.from_linear(nn.Conv1d(3, 3, 1), 2, 2)


def test_per_member_module_runs_each_copy_on_its_rows() -> None:
    torch.manual_seed(0)
    copies = [nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Dropout(0.5), nn.Linear(6, 3)) for _ in range(3)]
    head = PerMemberModule(copies)
    assert head.module[0].weight.shape == (3, 6, 4) and head.param_names[0] == "0.weight"
    x = torch.randn(3 * 2, 5, 4)
    out = head.eval()(x)
    for n, c in enumerate(copies):
        torch.testing.assert_close(out[2 * n:2 * n + 2], c.eval()(x[2 * n:2 * n + 2]))
        torch.testing.assert_close(head.merged_member(n)(x[:2]), c(x[:2]))
    out.sum().backward()
    assert head.module[3].weight.grad.shape == (3, 3, 6)
    same = PerMemberModule([copies[0]] * 2).train()(torch.ones(2, 6, 4))  # dropout: a mask per member
    assert not torch.equal(same[0], same[1])
    with pytest.raises(ValueError, match="not divisible by num_members=3"):
        head(torch.randn(4, 4))


def test_hf_families_are_recognised_by_structure() -> None:
    # HF ViT/DeiT/AST before transformers 5 named their projections attention.attention.query etc.
    layer = nn.Module()
    layer.attention = nn.Module()
    layer.attention.attention = nn.ModuleDict({n: nn.Linear(4, 4) for n in ("query", "key", "value")})
    layer.attention.output = nn.ModuleDict({"dense": nn.Linear(4, 4)})
    layer.intermediate = nn.ModuleDict({"dense": nn.Linear(4, 8)})
    model = nn.ModuleDict({"encoder": nn.ModuleList([layer])})
    assert resolve_target_modules(model, None) == [
        "encoder.0.attention.attention.query", "encoder.0.attention.attention.key",
        "encoder.0.attention.attention.value", "encoder.0.attention.output.dense"]
    with pytest.raises(ValueError, match=r"candidate tails: \['dense', 'key', 'query', 'value'\]"):
        resolve_target_modules(model, ["o_proj"])


def test_readme_llm_example_runs(capsys) -> None:
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## LLMs\n\n```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README LLMs", "exec"), scope)
    assert scope["logits"].shape == (5, 2, 12, 100) and scope["seq"].shape[0] == 2
    assert scope["seqs"].shape[:2] == (5, 2) and "torch.Size([2, 4])" in capsys.readouterr().out


@pytest.mark.parametrize("backend", [b for b in ("torch", "triton") if b in available_backends("cpu")])
def test_conv1d_base_is_read_in_place(backend: str) -> None:
    """The op reads a Conv1D's W0^T as the strided view it is: no copy of W0 per call (the torch and
    triton backends take any strides), forward or backward."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers.pytorch_utils import Conv1D

    class CopiesOf(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.copies = tuple(shape), []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default):
                if tuple(args[0].shape) in (self.shape, self.shape[::-1]):
                    self.copies.append(func)
            return func(*args, **(kwargs or {}))

    layer = FusedLoRAEnsembleLinear.from_linear(Conv1D(24, 40), num_members=2, rank=3, backend=backend)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2 * 3, 40, requires_grad=True)
    with CopiesOf(layer.weight.shape) as mode:
        layer(x).sum().backward()
    assert not mode.copies, mode.copies
