"""Base layers the fused kernels cannot read, and LoRA factors in their own dtype.

* bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, a torchao-quantized ``nn.Linear`` and a
  parametrized ``nn.Linear`` (all on the CPU): wrapped as :class:`LoRAEnsembleOverBase`, each member
  equals ``base(x) + s (x A_n^T) B_n^T`` and equals peft's LoRA over the same quantized layer
  (one adapter per member).
* ``adapter_dtype=torch.float32`` on a bf16 model: the factors, their gradients and the optimizer's
  state in fp32, the compute in bf16, against peft with fp32 adapters.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lora_ensemble import FusedLoRAEnsembleLinear, LoRAEnsemble, LoRAEnsembleOverBase, available_backends
from lora_ensemble.modules import kernels_can_read, wrap_linear

from .utils import assert_close_named

CPU_BACKENDS = available_backends("cpu")


class _Scaled(nn.Module):
    """A parametrization: the layer's weight is computed (``2 * W``) on every call."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


def _base(kind: str, d: int = 40, k: int = 24) -> nn.Module:
    torch.manual_seed(0)
    linear = nn.Linear(d, k)
    if kind == "parametrized":
        parametrize.register_parametrization(linear, "weight", _Scaled())
        return linear
    if kind == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = nn.Sequential(linear)
        quantize_(model, Int8WeightOnlyConfig())
        return model[0]
    bnb = pytest.importorskip("bitsandbytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "bnb-4bit":
            layer = bnb.nn.Linear4bit(d, k, compute_dtype=torch.float32, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(d, k, has_fp16_weights=False)
        layer.load_state_dict(linear.state_dict())
        return layer.to("cpu")  # quantizes the weight


KINDS = ["bnb-4bit", "bnb-8bit", "torchao-int8", "parametrized"]


class _Net(nn.Module):
    """A model of one such base layer, ``proj``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.proj = _base(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _importorskip(kind: str) -> None:
    pytest.importorskip("torchao" if kind.startswith("torchao") else "bitsandbytes" if kind.startswith("bnb")
                        else "torch")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
@pytest.mark.parametrize("kind", KINDS)
def test_members_over_an_unreadable_base_match_base_plus_update(kind, shared, backend):
    _importorskip(kind)
    base = _base(kind)
    assert not kernels_can_read(base)
    n, s = 3, 0.5
    layer = wrap_linear(base, n, 4, alpha=2.0, backend=backend)
    assert isinstance(layer, LoRAEnsembleOverBase) and layer.base_layer is base
    assert layer.adapter_dtype == torch.float32 and not any(p.requires_grad for p in base.parameters())
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 40, requires_grad=True)
    stacked = x if shared else x.repeat(n, 1, 1)
    out = layer(stacked, shared_input=shared)
    with torch.no_grad():
        base_out = base(x).double()
    for member in range(n):
        update = s * x.double() @ layer.lora_A[member].double().T @ layer.lora_B[member].double().T
        assert_close_named(f"member {member}", out[member * 2:(member + 1) * 2], base_out + update, torch.float32)
    dA, dB = torch.autograd.grad(out.square().sum(), (layer.lora_A, layer.lora_B))
    assert dA.abs().sum() > 0 and dB.abs().sum() > 0 and dA.dtype == torch.float32
    with pytest.raises(TypeError, match="cannot be merged"):
        layer.merged_member(0)


@pytest.mark.parametrize("kind", ["bnb-4bit", "bnb-8bit"])
def test_each_member_equals_peft_over_the_same_quantized_layer(kind):
    """peft's LoRA around the same bitsandbytes layer (on a CPU peft wraps it with its generic LoRA
    layer, ``base_layer(x) + lora``), one adapter per member, against the ensemble."""
    _importorskip(kind)
    peft = pytest.importorskip("peft")

    n, r, alpha = 3, 4, 8.0
    ensemble = LoRAEnsemble(_Net(kind), n, r, target_modules=["proj"], alpha=alpha, head=None, backend="torch")
    layer = ensemble.model.proj
    assert isinstance(layer, LoRAEnsembleOverBase)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 40)
    logits = ensemble(x)  # [N, B, k]
    for member in range(n):
        config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(_Net(kind), config)
        peft_layer = model.base_model.model.proj
        assert type(peft_layer.base_layer).__name__ == type(layer.base_layer).__name__  # LoRA around the same kind
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A[member])
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B[member])
            assert_close_named(f"member {member}", logits[member], model(x).double(), torch.float32)


def test_a_module_that_is_no_linear_is_refused_before_anything_changes():
    conv = nn.Conv1d(4, 4, 1)
    with pytest.raises(TypeError, match="cannot wrap a Conv1d"):
        wrap_linear(conv, 2, 2)


def test_fp32_adapters_on_a_bf16_model_train_in_fp32_and_match_peft():
    """adapter_dtype=float32 on a bf16 base: fp32 factors, gradients and Adam state; bf16 activations.
    peft with fp32 adapters on the same base agrees to bf16 precision."""
    peft = pytest.importorskip("peft")

    def mlp():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16)).to(torch.bfloat16)

    n, r = 2, 4
    ensemble = LoRAEnsemble(mlp(), n, r, target_modules=["0", "2"], alpha=8.0, head=None, backend="torch",
                            adapter_dtype=torch.float32)
    layers = ensemble.lora_layers()
    assert all(isinstance(layer, FusedLoRAEnsembleLinear) for layer in layers.values())
    assert all(layer.lora_A.dtype == layer.lora_B.dtype == torch.float32 for layer in layers.values())
    assert all(layer.weight.dtype == torch.bfloat16 for layer in layers.values())
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(0, 0.1)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    out = ensemble(x)
    assert out.dtype == torch.bfloat16
    optimizer = torch.optim.Adam([p for p in ensemble.parameters() if p.requires_grad], lr=1e-3)
    out.float().square().mean().backward()
    optimizer.step()
    for p in (p for p in ensemble.parameters() if p.requires_grad):
        assert p.grad.dtype == torch.float32 and optimizer.state[p]["exp_avg"].dtype == torch.float32

    for member in range(n):
        config = peft.LoraConfig(r=r, lora_alpha=8.0, target_modules=["0", "2"])
        model = peft.get_peft_model(mlp(), config)  # peft keeps the adapters in fp32 by default
        for name, layer in layers.items():
            peft_layer = model.base_model.model.get_submodule(name)
            assert peft_layer.lora_A["default"].weight.dtype == torch.float32
            with torch.no_grad():
                peft_layer.lora_A["default"].weight.copy_(layer.lora_A[member])
                peft_layer.lora_B["default"].weight.copy_(layer.lora_B[member])
        with torch.no_grad():
            assert_close_named(f"member {member}", ensemble(x)[member], model(x).double(), torch.bfloat16)


def test_adapter_dtype_of_a_single_layer_and_its_checks():
    layer = FusedLoRAEnsembleLinear.from_linear(nn.Linear(8, 6).half(), 2, 3, adapter_dtype=torch.float32)
    assert layer.adapter_dtype == torch.float32 and layer.weight.dtype == torch.float16
    copy.deepcopy(layer)  # plain module state
    with pytest.raises(ValueError, match="adapter_dtype"):
        FusedLoRAEnsembleLinear(8, 6, 2, 3, adapter_dtype=torch.int8)


@pytest.mark.parametrize("kind", ["bnb-4bit", "torchao-int8"])
def test_members_over_a_quantized_base_save_and_load(kind, tmp_path):
    _importorskip(kind)
    from lora_ensemble.io import load_members, save_members

    ensemble = LoRAEnsemble(_Net(kind), 3, 4, target_modules=["proj"], head=None, backend="torch")
    with torch.no_grad():
        ensemble.model.proj.lora_B.normal_()
    x = torch.randn(2, 40)
    save_members(ensemble, tmp_path)
    again = load_members(_Net(kind), tmp_path, backend="torch")
    assert isinstance(again.model.proj, LoRAEnsembleOverBase)
    torch.testing.assert_close(again(x), ensemble(x))
