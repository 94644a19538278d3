"""LLM benchmarks: a LoRA-Ensemble of a small Llama generating and scoring multiple-choice answers.

Providers (same prompts, same LoRA factors):

==================  =====================================================================
``ensemble``        ``LoRAEnsemble(llama, N, r)``: ``generate`` (HF generate of every member on the
                    stacked batch, one KV cache) and ``predict`` over the answer tokens
``limit``           the plain model on the ``N*B`` prompts (HF ``generate`` / one forward): what
                    one model at ``N`` times the batch costs, the floor of any ensemble
``peft_sequential`` one peft model with ``N`` adapters, run one adapter after another on the ``B``
                    prompts (what the LLM-uncertainty code bases do)
==================  =====================================================================

Modes: ``generate`` (greedy, exactly ``new_tokens`` tokens: no early end-of-sequence) and
``predict`` (next-token distribution over the answer letters at the last prompt token). With a GPU a
Llama of hidden size 1024 and 8 layers, 16 members of rank 8, 4 prompts of 64 tokens, 32 new
tokens, in bfloat16; without one, a tiny model in float32 (a smoke-sized run). Host and device time
as in :mod:`benchmarks.measure` (decoding loops are not captured as CUDA graphs).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from lora_ensemble import LoRAEnsemble
from lora_ensemble._optional import import_failure, optional_dependency

from .measure import synchronized_timer, time_step
from .shapes import bench_device, bench_dtype

pytestmark = pytest.mark.benchmark(timer=synchronized_timer, disable_gc=True)

LLM_PROVIDERS: tuple[str, ...] = ("ensemble", "limit", "peft_sequential")
LLM_MODES: tuple[str, ...] = ("generate", "predict")
ANSWER_TOKENS = (11, 12, 13, 14)  # the answer letters' token ids


@dataclass(frozen=True)
class LLMShape:
    """A Llama config and the workload: ``num_members`` of rank ``rank``, ``batch`` prompts of
    ``prompt_len`` tokens, ``new_tokens`` decoded."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    num_members: int
    rank: int
    batch: int
    prompt_len: int
    new_tokens: int

    def __str__(self) -> str:
        return (f"llama-h{self.hidden}-L{self.layers} N{self.num_members} r{self.rank} B{self.batch} "
                f"T{self.prompt_len}+{self.new_tokens}")


GPU_LLM = LLMShape(hidden=1024, layers=8, heads=16, kv_heads=4, intermediate=2816, vocab=32000, num_members=16,
                   rank=8, batch=4, prompt_len=64, new_tokens=32)
CPU_LLM = LLMShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256, num_members=4, rank=4,
                   batch=2, prompt_len=8, new_tokens=4)


def selected_llm_shape(device: torch.device) -> LLMShape:
    """The GPU workload on CUDA, the smoke-sized one elsewhere."""
    return GPU_LLM if device.type == "cuda" else CPU_LLM


def llama(shape: LLMShape, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A randomly initialised Llama (seed 0) in eval mode; end-of-sequence disabled (fixed-length decoding)."""
    with optional_dependency("the LLM benchmark"):
        import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                                      num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                                      intermediate_size=shape.intermediate, vocab_size=shape.vocab,
                                      max_position_embeddings=shape.prompt_len + shape.new_tokens,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@dataclass
class LLMRun:
    """A provider bound to its model: ``generate(ids)`` and ``predict(ids)``, each ``[B, T]`` prompts."""

    generate: Callable[[Tensor], Tensor]
    predict: Callable[[Tensor], Tensor]


def llm_unavailable_reason(provider: str) -> str | None:
    """Why ``provider`` cannot run here (peft missing, or its import failing: the exception), or None."""
    if provider not in LLM_PROVIDERS:
        return f"unknown provider {provider!r}; choose one of {LLM_PROVIDERS}"
    if provider == "peft_sequential":
        return import_failure("peft")
    return None


def build_llm_run(provider: str, shape: LLMShape, device: torch.device, dtype: torch.dtype) -> LLMRun:
    """Bind ``provider`` to a Llama of ``shape``; the ensemble's and the adapters' LoRA factors are the
    same random values (seed 1), so every provider computes the same members."""
    model = llama(shape, device, dtype)
    ensemble = LoRAEnsemble(copy.deepcopy(model), shape.num_members, shape.rank, alpha=2.0 * shape.rank)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in ensemble.lora_layers().values():
            layer.lora_B.normal_(0, 0.02)
    new, answers = shape.new_tokens, list(ANSWER_TOKENS)

    def hf_generate(hf_model: nn.Module, ids: Tensor) -> Tensor:
        return hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False)

    def next_token_probs(hf_model: nn.Module, ids: Tensor) -> Tensor:
        return hf_model(ids, logits_to_keep=1).logits[:, -1, answers].float().softmax(-1)

    if provider == "ensemble":
        return LLMRun(lambda ids: ensemble.generate(ids, max_new_tokens=new, min_new_tokens=new),
                      lambda ids: ensemble.predict(ids, answer_token_ids=answers).mean_probs)
    if provider == "limit":
        n = shape.num_members
        return LLMRun(lambda ids: hf_generate(model, ids.repeat(n, 1)),
                      lambda ids: next_token_probs(model, ids.repeat(n, 1)))
    with optional_dependency("the LLM benchmark's peft_sequential provider"):
        import peft

    config = peft.LoraConfig(r=shape.rank, lora_alpha=2.0 * shape.rank,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = peft.get_peft_model(model, config, adapter_name="member0")
    for member in range(1, shape.num_members):
        peft_model.add_adapter(f"member{member}", config)
    with torch.no_grad():
        for name, layer in ensemble.lora_layers().items():
            peft_layer = peft_model.base_model.model.get_submodule(name)
            for member in range(shape.num_members):
                peft_layer.lora_A[f"member{member}"].weight.copy_(layer.lora_A[member])
                peft_layer.lora_B[f"member{member}"].weight.copy_(layer.lora_B[member])
    peft_model.eval()

    def one_after_another(call: Callable[[nn.Module, Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        def run(ids: Tensor) -> Tensor:
            outputs = []
            for member in range(shape.num_members):
                peft_model.set_adapter(f"member{member}")
                outputs.append(call(peft_model, ids))
            return torch.stack(outputs)
        return run

    return LLMRun(one_after_another(hf_generate), one_after_another(next_token_probs))


@pytest.mark.parametrize("provider", LLM_PROVIDERS)
@pytest.mark.parametrize("mode", LLM_MODES)
def test_llm(benchmark, mode: str, provider: str) -> None:
    device, dtype = bench_device(), bench_dtype()
    shape = selected_llm_shape(device)
    benchmark.group = f"llm_{mode} | {shape}"  # before any skip: the report lists a skipped row as MISSING
    benchmark.extra_info.update(provider=provider, mode=mode, shape=str(shape), dtype=str(dtype).removeprefix("torch."))
    reason = llm_unavailable_reason(provider)
    if reason is not None:
        pytest.skip(reason)
    run = build_llm_run(provider, shape, device, dtype)
    torch.manual_seed(0)
    ids = torch.randint(3, shape.vocab, (shape.batch, shape.prompt_len), device=device)
    call = run.generate if mode == "generate" else run.predict

    def step() -> Tensor:
        with torch.no_grad():
            return call(ids)

    benchmark.extra_info.update(num_members=shape.num_members, rank=shape.rank, batch=shape.batch)
    time_step(benchmark, step, device, no_graph="decoding and adapter loops are not captured as CUDA graphs")
