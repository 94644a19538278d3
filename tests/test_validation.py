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
        (dict(scaling=float("nan")), ValueError, ["scaling must be finite", "nan"]),
        (dict(scaling=float("-inf")), ValueError, ["scaling must be finite", "-inf"]),
        (dict(scaling="0.5"), TypeError, ["scaling must be a real number"]),
        (dict(x=torch.randn(12, 0), weight=torch.randn(6, 0), lora_A=torch.randn(3, 2, 0)), ValueError,
         ["in_features d must be >= 1", "(12, 0)", "weight shape (6, 0)"]),
    ],
    ids=["batch-not-divisible", "wrong-d", "1-d-x", "3-d-weight", "2-d-A", "A-wrong-d", "B-wrong-r",
         "B-wrong-N", "bias-shape", "mixed-dtype", "int-dtype", "non-tensor", "mixed-device", "unknown-backend",
         "backend-type", "cuda-on-cpu", "nan-scaling", "inf-scaling", "str-scaling", "zero-in-features"],
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


def test_delta_op_refuses_nonfinite_scaling_and_zero_in_features():
    from lora_ensemble import lora_ensemble_delta

    x, base = torch.randn(6, 5), torch.randn(6, 4)
    with pytest.raises(ValueError, match="scaling must be finite"):
        lora_ensemble_delta(x, base, torch.randn(3, 2, 5), torch.randn(3, 4, 2), float("nan"))
    with pytest.raises(ValueError, match=r"in_features d must be >= 1.*\(6, 0\)"):
        lora_ensemble_delta(torch.randn(6, 0), base, torch.randn(3, 2, 0), torch.randn(3, 4, 2))


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "2"])
def test_layers_refuse_a_nonfinite_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        FusedLoRAEnsembleLinear(20, 12, num_members=3, rank=5, alpha=alpha)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        FusedLoRAEnsembleLinear.from_linear(torch.nn.Linear(20, 12), 3, 5, alpha=alpha)


def _over_base(linear, num_members, rank, **options):
    from lora_ensemble import LoRAEnsembleOverBase

    return LoRAEnsembleOverBase(linear, num_members, rank, **options)


LAYER_BUILDERS = {
    "constructor": lambda linear, n, r, **o: FusedLoRAEnsembleLinear(linear.in_features, linear.out_features, n, r,
                                                                     **o),
    "from_linear": FusedLoRAEnsembleLinear.from_linear,
    "over_base": _over_base,
}


@pytest.mark.parametrize("build", list(LAYER_BUILDERS.values()), ids=list(LAYER_BUILDERS))
def test_rank_above_the_layer_sizes_is_refused(build):
    linear = torch.nn.Linear(20, 6)
    with pytest.raises(ValueError, match=r"rank 7 is above min\(in_features, out_features\) = min\(20, 6\) = 6"):
        build(linear, 2, 7)
    assert build(linear, 2, 6).rank == 6
    assert build(linear, 2, 7, allow_rank_above_size=True).lora_A.shape == (2, 7, 20)


@pytest.mark.parametrize("build", list(LAYER_BUILDERS.values()), ids=list(LAYER_BUILDERS))
def test_misspelt_backend_is_refused_at_construction(build):
    linear = torch.nn.Linear(8, 6)
    with pytest.raises(ValueError, match=r"one of \('auto', 'torch', 'triton', 'cuda'\), got 'trition'"):
        build(linear, 2, 2, backend="trition")
    with pytest.raises(TypeError, match="backend must be a str"):
        build(linear, 2, 2, backend=None)


def test_a_valid_backend_unavailable_here_is_refused_at_the_call():
    if torch.cuda.is_available():
        pytest.skip("the cuda backend may run here")
    layer = FusedLoRAEnsembleLinear(8, 6, 2, 2, backend="cuda")  # constructed: valid name
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        layer(torch.randn(4, 8))
