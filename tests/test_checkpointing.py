"""Gradient checkpointing (``torch.utils.checkpoint``, ``use_reentrant=False``) through the fused op.

A checkpointed block drops its activations and re-runs its forward inside backward; the gradients
must equal the plain run's and the float64 reference's.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lora_ensemble import FusedLoRAEnsembleLinear, available_backends
from lora_ensemble.reference import lora_ensemble_reference_backward

from .utils import assert_close_named

CPU_BACKENDS = available_backends("cpu")


class _Block(nn.Module):
    """A pre-norm MLP block of two LoRA-Ensemble layers, the shape of a transformer's MLP."""

    def __init__(self, dim: int, hidden: int, num_members: int, rank: int, backend: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = FusedLoRAEnsembleLinear(dim, hidden, num_members, rank, backend=backend)
        self.fc2 = FusedLoRAEnsembleLinear(hidden, dim, num_members, rank, backend=backend)
        with torch.no_grad():  # non-zero B, so the LoRA path carries gradient through dx
            self.fc1.lora_B.normal_()
            self.fc2.lora_B.normal_()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


def _grads(model: nn.Module, x: Tensor, grad_out: Tensor, checkpointed: bool) -> tuple[Tensor, dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out = checkpoint(model, x, use_reentrant=False) if checkpointed else model(x)
    out.backward(grad_out)
    return out.detach(), {"x": x.grad, **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_checkpointed_block_matches_plain_block(backend: str) -> None:
    num_members = 3
    model = _Block(20, 36, num_members, rank=2, backend=backend)
    forward_calls = []
    model.fc1.register_forward_hook(lambda *_: forward_calls.append(1))
    x = torch.randn(num_members * 2, 5, 20)
    grad_out = torch.randn_like(x)

    plain_out, plain = _grads(model, x, grad_out, checkpointed=False)
    assert len(forward_calls) == 1
    ckpt_out, ckpt = _grads(model, x, grad_out, checkpointed=True)
    assert len(forward_calls) == 3, "the checkpointed forward must run again during backward"

    assert_close_named("out", ckpt_out, plain_out.double(), torch.float32)
    assert plain.keys() == ckpt.keys() and {"fc1.lora_A", "fc2.lora_B"} <= plain.keys()
    assert "fc1.weight" not in ckpt, "the frozen W0 must not get a gradient"
    for name, want in plain.items():
        assert_close_named(f"d{name}", ckpt[name], want.double(), torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shared_input", [False, True])
def test_checkpointed_layer_matches_reference(backend: str, shared_input: bool) -> None:
    layer = FusedLoRAEnsembleLinear(17, 11, 4, 1, alpha=3.0, backend=backend, shared_input=shared_input)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 2, 17) if shared_input else torch.randn(4 * 3, 2, 17)
    grad_out = torch.randn(4 * 3, 2, 11)
    _, got = _grads(layer, x, grad_out, checkpointed=True)
    ref = lora_ensemble_reference_backward(grad_out, x, layer.weight, layer.lora_A, layer.lora_B, layer.scaling,
                                           shared_input)
    assert_close_named("dx", got["x"], ref.x, torch.float32)
    assert_close_named("dlora_A", got["lora_A"], ref.lora_A, torch.float32)
    assert_close_named("dlora_B", got["lora_B"], ref.lora_B, torch.float32)


def test_checkpoint_recomputes_under_the_same_autocast_state() -> None:
    layer = FusedLoRAEnsembleLinear(24, 32, 2, 4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2 * 3, 24)
    grad_out = torch.randn(2 * 3, 32, dtype=torch.bfloat16)
    results = []
    for checkpointed in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = _grads(layer, x, grad_out, checkpointed)
        assert out.dtype == torch.bfloat16
        results.append((out, grads))
    (plain_out, plain), (ckpt_out, ckpt) = results
    torch.testing.assert_close(ckpt_out, plain_out, rtol=0, atol=0)
    for name, want in plain.items():
        torch.testing.assert_close(ckpt[name], want, rtol=0, atol=0, msg=f"d{name} differs")


def test_checkpoint_inside_torch_compile_fullgraph() -> None:
    torch._dynamo.reset()
    model = _Block(16, 24, 2, rank=3, backend="torch")

    def run(x: Tensor) -> Tensor:
        return checkpoint(model, x, use_reentrant=False)

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    x = torch.randn(2 * 4, 16)
    grad_out = torch.randn_like(x)
    want_out, want = _grads(model, x, grad_out, checkpointed=False)
    model.zero_grad(set_to_none=True)
    xc = x.clone().requires_grad_(True)
    got_out = compiled(xc)
    got_out.backward(grad_out)
    assert_close_named("out", got_out, want_out.double(), torch.float32)
    assert_close_named("dx", xc.grad, want["x"].double(), torch.float32)
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert_close_named(f"d{name}", p.grad, want[name].double(), torch.float32)
