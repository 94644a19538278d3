"""Second derivatives through the ops: ``gradgradcheck`` in float64 on the torch backend (stacked and
shared input, the fused op and the delta op, the eager Functions and the registered custom ops), the
fused backends' Hessian-vector products against the torch backend's, and torch.compile's refusal."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lora_ensemble import available_backends, fused_lora_ensemble_linear, lora_ensemble_delta
from lora_ensemble.ops import fused_linear, lora_delta

from .utils import assert_close_named

F64 = torch.float64
NUM_MEMBERS, ROWS, D, K, R = 2, 3, 5, 4, 2
BACKEND_DEVICES = [pytest.param(b, "cpu", id=f"{b}-cpu") for b in available_backends("cpu") if b != "torch"] + [
    pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.gpu)
    for b in (available_backends("cuda") if torch.cuda.is_available() else [])
]


def _leaf(*shape: int) -> Tensor:
    return torch.randn(*shape, dtype=F64).requires_grad_()


def _inputs(shared: bool) -> dict[str, Tensor]:
    """Float64 leaves; ``base`` is the delta op's base-layer output."""
    rows = ROWS if shared else NUM_MEMBERS * ROWS
    return {"x": _leaf(rows, D), "weight": _leaf(K, D), "bias": _leaf(K), "lora_A": _leaf(NUM_MEMBERS, R, D),
            "lora_B": _leaf(NUM_MEMBERS, K, R), "base": _leaf(rows, K)}


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_fused_linear_gradgradcheck(shared: bool) -> None:
    t = _inputs(shared)

    def fn(x, weight, bias, lora_A, lora_B):
        return fused_lora_ensemble_linear(x, weight, bias, lora_A, lora_B, 0.7, shared_input=shared, backend="torch")

    assert torch.autograd.gradgradcheck(fn, (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"]))


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_delta_gradgradcheck(shared: bool) -> None:
    """The delta op: the path of lora_dropout and of quantized bases."""
    t = _inputs(shared)

    def fn(x, base, lora_A, lora_B):
        return lora_ensemble_delta(x, base, lora_A, lora_B, 0.7, shared_input=shared, backend="torch")

    assert torch.autograd.gradgradcheck(fn, (t["x"], t["base"], t["lora_A"], t["lora_B"]))


@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_registered_ops_gradgradcheck(shared: bool) -> None:
    """The custom ops called eagerly (what torch.compile would trace) differentiate twice too."""
    t = _inputs(shared)

    def per_member(x: Tensor) -> Tensor:
        return x if shared else x.view(NUM_MEMBERS, ROWS, -1)

    def fused(x, weight, bias, lora_A, lora_B):
        return fused_linear(per_member(x), weight, bias, lora_A, lora_B, 0.7, shared, "torch")[0]

    def delta(x, base, lora_A, lora_B):
        return lora_delta(per_member(x), per_member(base), lora_A, lora_B, 0.7, shared, "torch")[0]

    assert torch.autograd.gradgradcheck(fused, (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"]))
    assert torch.autograd.gradgradcheck(delta, (t["x"], t["base"], t["lora_A"], t["lora_B"]))


def _hessian_vector_product(backend: str, t: dict[str, Tensor], shared: bool, delta: bool) -> tuple[Tensor, ...]:
    """``H v`` of ``L = sum(out * w)`` over ``(x, lora_A, lora_B)`` for fixed random ``w`` and ``v``."""
    names = ("x", "lora_A", "lora_B")
    if delta:
        out = lora_ensemble_delta(t["x"], t["base"], t["lora_A"], t["lora_B"], 0.7, shared_input=shared,
                                  backend=backend)
    else:
        out = fused_lora_ensemble_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 0.7,
                                         shared_input=shared, backend=backend)
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(out.shape, generator=gen, dtype=F64).to(out)
    grads = torch.autograd.grad((out * w).sum(), [t[n] for n in names], create_graph=True)
    vs = [torch.randn(t[n].shape, generator=gen, dtype=F64).to(t[n]) for n in names]
    dot = sum((g * v).sum() for g, v in zip(grads, vs))
    return torch.autograd.grad(dot, [t[n] for n in names])


@pytest.mark.parametrize(("backend", "device"), BACKEND_DEVICES)
@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
@pytest.mark.parametrize("delta", [False, True], ids=["fused", "delta"])
def test_fused_backends_second_derivatives_match_float64(backend: str, device: str, shared: bool,
                                                         delta: bool) -> None:
    """A fused backend's backward under create_graph runs differentiable torch ops: its Hessian-vector
    product over (x, A, B) in fp32 equals the torch backend's in float64."""
    t64 = _inputs(shared)
    t32 = {n: v.detach().to(device, torch.float32).requires_grad_() for n, v in t64.items()}
    want = _hessian_vector_product("torch", t64, shared, delta)
    got = _hessian_vector_product(backend, t32, shared, delta)
    for name, g, w in zip(("x", "lora_A", "lora_B"), got, want):
        assert_close_named(f"Hv[{name}]", g, w, torch.float32, (1e-4, 1e-4))


def test_hessian_cross_term_matches_autograd_of_the_composite() -> None:
    """d(dL/dB)/dx, the term a backward without the graph of x A^T misses (it was off by 30.6 on a largest
    entry of 58.5), against autograd of the plain composite."""
    t = _inputs(False)
    x, A, B = t["x"], t["lora_A"], t["lora_B"]

    def composite(x, A, B):
        rows = x.view(NUM_MEMBERS, ROWS, D)
        return (rows @ t["weight"].T + t["bias"] + 0.7 * (rows @ A.mT) @ B.mT).reshape(-1, K)

    def cross(f) -> Tensor:
        (dB,) = torch.autograd.grad(f(x, A, B).pow(2).sum(), B, create_graph=True)
        return torch.autograd.grad(dB.sum(), x)[0]

    ours = cross(lambda x, A, B: fused_lora_ensemble_linear(x, t["weight"], t["bias"], A, B, 0.7, backend="torch"))
    assert_close_named("d(dB)/dx", ours, cross(composite), F64)


def test_double_backward_under_torch_compile_is_a_clear_error() -> None:
    torch._dynamo.reset()
    t = _inputs(False)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(x, lora_A, lora_B):
        return fused_lora_ensemble_linear(x, t["weight"], t["bias"], lora_A, lora_B, 0.7)

    out = fn(t["x"], t["lora_A"], t["lora_B"])
    (dB,) = torch.autograd.grad(out.pow(2).sum(), t["lora_B"], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(dB.sum(), t["x"])
