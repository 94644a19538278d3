"""Bad input: a clear error naming the argument and the shapes, raised before any kernel runs,
with no tensor modified."""

import pytest
import torch

from lora_ensemble import FusedLoRAEnsembleLinear, fused_lora_ensemble_linear
from lora_ensemble.backends import resolve_backend

from .utils import make_inputs


def _call(**override):
    inp = make_inputs(3, 4, 8, 6, 2, requires_grad=())
    args = dict(x=inp.x, weight=inp.weight, bias=inp.bias, lora_A=inp.lora_A, lora_B=inp.lora_B,
                scaling=inp.scaling, shared_input=False, backend="torch")
    args.update(override)
    snapshot = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and not v.is_meta}
    try:
        fused_lora_ensemble_linear(**args)
    finally:
        for k, v in snapshot.items():
            assert torch.equal(args[k], v), f"{k} was modified"


@pytest.mark.parametrize(
    "override, exc, words",
    [
        (dict(x=torch.randn(7, 8)), ValueError, ["x's leading dim 7", "(7, 8)", "N=3"]),
        (dict(x=torch.randn(12, 9)), ValueError, ["x's last dim 9", "(12, 9)", "(6, 8)"]),
        (dict(x=torch.randn(8)), ValueError, ["x must have at least 2 dims", "(8,)"]),
        (dict(weight=torch.randn(6, 8, 1)), ValueError, ["weight must be 2-D", "(6, 8, 1)"]),
        (dict(lora_A=torch.randn(2, 8)), ValueError, ["lora_A must be 3-D", "(2, 8)"]),
        (dict(lora_A=torch.randn(3, 2, 9)), ValueError, ["lora_A shape (3, 2, 9)", "d=8"]),
        (dict(lora_B=torch.randn(3, 6, 3)), ValueError, ["lora_B shape (3, 6, 3)", "(3, 6, 2)"]),
        (dict(lora_B=torch.randn(2, 6, 2)), ValueError, ["lora_B shape (2, 6, 2)", "(3, 6, 2)"]),
        (dict(bias=torch.randn(5)), ValueError, ["bias shape (5,)", "(6,)"]),
        (dict(x=torch.randn(12, 8, dtype=torch.float64)), TypeError, ["one dtype", "float64", "float32"]),
        (dict(x=torch.randn(12, 8).to(torch.int32)), TypeError, ["x dtype torch.int32"]),
        (dict(weight=[[1.0]]), TypeError, ["weight must be a torch.Tensor", "list"]),
        (dict(x=torch.randn(12, 8, device="meta")), RuntimeError, ["one device", "meta"]),
        (dict(backend="nope"), ValueError, ["backend", "nope", "triton"]),
        (dict(backend=3), TypeError, ["backend must be a str"]),
        (dict(backend="cuda"), RuntimeError, ["backend='cuda'", "not available"]),
    ],
    ids=["batch-not-divisible", "wrong-d", "1-d-x", "3-d-weight", "2-d-A", "A-wrong-d", "B-wrong-r",
         "B-wrong-N", "bias-shape", "mixed-dtype", "int-dtype", "non-tensor", "mixed-device", "unknown-backend",
         "backend-type", "cuda-on-cpu"],
)
def test_bad_input_is_named(override, exc, words):
    with pytest.raises(exc) as info:
        _call(**override)
    for w in words:
        assert w in str(info.value), f"{w!r} not in message: {info.value}"


def test_fused_backend_rejects_float64():
    with pytest.raises(TypeError, match="float64"):
        resolve_backend("triton", "cpu", torch.float64)
    assert resolve_backend("auto", "cpu", torch.float64) == "torch"


def test_module_constructor_errors():
    with pytest.raises(ValueError, match="rank must be a positive int"):
        FusedLoRAEnsembleLinear(4, 4, 2, 0)
    with pytest.raises(TypeError, match="nn.Linear"):
        FusedLoRAEnsembleLinear.from_linear(torch.nn.Conv1d(2, 2, 1), 2, 2)
    with pytest.raises(IndexError, match=r"\[0, 2\)"):
        FusedLoRAEnsembleLinear(4, 4, 2, 1).merged_member(2)
