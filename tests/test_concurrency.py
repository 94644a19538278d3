"""Calls of one LoRAEnsemble from several threads at once (a server's thread pool) give the sequential
results, and no call, also one that raises half-way, leaves a module or parameter changed."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import Tensor, nn

from lora_ensemble import LoRAEnsemble, PerMemberModule
from lora_ensemble.calls import MEMBER_SELECTION

CALLS_PER_THREAD = 12


def vit(module_head: bool = False) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    if module_head:  # a head of several layers: a PerMemberModule
        model.head = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 10))
    return model.eval()


def _distinct_members(ensemble: LoRAEnsemble) -> LoRAEnsemble:
    with torch.no_grad():
        for layer in ensemble.lora_layers().values():
            layer.lora_B.normal_(std=0.1)
    return ensemble


def _state(ensemble: LoRAEnsemble) -> list[tuple[str, int, tuple[int, ...]]]:
    """Every parameter's name, identity and shape, and every module's mode."""
    return ([(name, id(p), tuple(p.shape)) for name, p in ensemble.named_parameters()]
            + [(name, int(m.training), ()) for name, m in ensemble.named_modules()])


def _concurrent(fn, inputs: list, threads: int = 2) -> list[list]:
    """Each thread calls ``fn(inputs[i])`` CALLS_PER_THREAD times, starting together (a barrier)."""
    barrier = threading.Barrier(threads)

    def work(i: int) -> list:
        barrier.wait()
        return [fn(inputs[i]) for _ in range(CALLS_PER_THREAD)]

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(work, range(threads)))


OPTIONS = {
    "share_first_input": {"share_first_input": True},
    "replicate_at": {"replicate_at": "blocks"},
    "member_chunk_size": {"member_chunk_size": 2},
    "all": {"member_chunk_size": 3, "replicate_at": "blocks", "share_first_input": True},
}


@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("module_head", [False, True], ids=["linear-head", "module-head"])
def test_threads_calling_one_ensemble_get_the_sequential_results(options: dict, module_head: bool) -> None:
    ensemble = _distinct_members(LoRAEnsemble(vit(module_head), num_members=4, rank=4,
                                              head="head" if module_head else "auto", **options))
    assert isinstance(ensemble.head, PerMemberModule) == module_head
    before = _state(ensemble)
    inputs = [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)]  # two batch sizes: a mix-up shows
    with torch.no_grad():
        want = [ensemble(x) for x in inputs]
        results = _concurrent(ensemble, inputs)
    for i, outs in enumerate(results):
        for out in outs:
            assert torch.equal(out, want[i]), f"thread {i}: a result differs from the sequential one"
    assert _state(ensemble) == before


def test_threads_predicting_and_training_steps_see_their_own_calls() -> None:
    """predict on an eval-mode ensemble and forward + backward with gradients, at once."""
    ensemble = _distinct_members(LoRAEnsemble(vit(), num_members=4, rank=4, member_chunk_size=2,
                                              share_first_input=True))
    inputs = [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)]

    def grads(x: Tensor) -> list[Tensor]:
        params = [p for p in ensemble.parameters() if p.requires_grad]
        return list(torch.autograd.grad(ensemble(x).square().mean(), params))

    want_probs = ensemble.predict(inputs[0]).mean_probs
    want_grads = grads(inputs[1])
    barrier = threading.Barrier(2)

    def work(i: int) -> list:
        barrier.wait()
        if i == 0:
            return [ensemble.predict(inputs[0]).mean_probs for _ in range(CALLS_PER_THREAD)]
        return [grads(inputs[1]) for _ in range(CALLS_PER_THREAD)]

    with ThreadPoolExecutor(2) as pool:
        probs, gradients = pool.map(work, range(2))
    assert all(torch.equal(p, want_probs) for p in probs)
    assert all(torch.equal(g, w) for got in gradients for g, w in zip(got, want_grads))


@pytest.mark.parametrize("ensemble_rule", [False, "mean_probs"])
def test_threads_generating_get_the_sequential_tokens(ensemble_rule: bool | str) -> None:
    """Per-member generation and ensemble decoding (whose calls replicate the batch at the entry and combine
    the members' logits on the way out, through the thread's call state) in two threads at once."""
    from .hf_tiny import VOCAB, causal_lm

    torch.manual_seed(2)
    ensemble = _distinct_members(LoRAEnsemble(causal_lm("llama"), num_members=4, rank=2, share_first_input=True))
    ensemble.model.generation_config.eos_token_id = None  # decode every token
    before = _state(ensemble)
    prompts = [torch.randint(3, VOCAB, (1, 4)), torch.randint(3, VOCAB, (2, 3))]

    def generate(ids: Tensor) -> Tensor:
        return ensemble.generate(ids, max_new_tokens=3, do_sample=False, ensemble=ensemble_rule)

    want = [generate(ids) for ids in prompts]
    for i, outs in enumerate(_concurrent(generate, prompts)):
        assert all(torch.equal(out, want[i]) for out in outs), f"thread {i}"
    assert _state(ensemble) == before


class _Failure(Exception):
    pass


@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_a_call_that_raises_half_way_leaves_nothing_changed(options: dict) -> None:
    ensemble = _distinct_members(LoRAEnsemble(vit(), num_members=4, rank=4, **options))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ensemble(x)
    before = _state(ensemble)
    calls = []

    def fail_in_the_last_chunk(module: nn.Module, args: tuple) -> None:
        calls.append(1)
        if len(calls) == len(ensemble._chunks()):  # half-way through the call: after the first block
            raise _Failure

    handle = ensemble.model.blocks[1].register_forward_pre_hook(fail_in_the_last_chunk)
    with pytest.raises(_Failure):
        ensemble(x)
    handle.remove()
    assert _state(ensemble) == before
    assert MEMBER_SELECTION.value is None and ensemble._calls.value is None
    with torch.no_grad():
        assert torch.equal(ensemble(x), want)
