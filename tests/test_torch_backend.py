"""The ``torch`` backend and the registered op against the float64 reference."""

import pytest
import torch

from lora_ensemble import fused_lora_ensemble_linear
from lora_ensemble.reference import lora_ensemble_reference

from .utils import check_against_reference, make_inputs

# (N, rows per member, d, k, r, lead dims)
SHAPES = [
    (4, 33, 67, 45, 1, None),
    (1, 1, 16, 16, 4, None),
    (3, 12, 19, 23, 8, (3, 4)),
    (16, 5, 48, 40, 16, None),
    (2, 7, 33, 65, 33, (7,)),
]
IDS = [f"N{n}-M{m}-d{d}-k{k}-r{r}-lead{lead}" for n, m, d, k, r, lead in SHAPES]


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("shared_input", [False, True], ids=["stacked", "shared"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
def test_matches_reference(shape, shared_input, dtype):
    n, m, d, k, r, lead = shape
    inp = make_inputs(n, m, d, k, r, dtype=dtype, shared_input=shared_input, lead=lead)
    check_against_reference(inp, "torch")


@pytest.mark.parametrize("shared_input", [False, True], ids=["stacked", "shared"])
def test_noncontiguous_no_bias_trainable_base(shared_input):
    inp = make_inputs(3, 10, 21, 14, 5, shared_input=shared_input, bias=False, noncontiguous=True,
                      requires_grad=("x", "weight", "lora_A", "lora_B"))
    assert not inp.x.is_contiguous() and not inp.lora_A.is_contiguous()
    check_against_reference(inp, "torch")


def test_trainable_bias_and_weight():
    inp = make_inputs(2, 6, 9, 11, 3, requires_grad=("x", "weight", "bias", "lora_A", "lora_B"))
    check_against_reference(inp, "torch")


@pytest.mark.parametrize("wanted", [("lora_A",), ("lora_B",), ("x",), ("lora_A", "lora_B")])
def test_only_requested_grads(wanted):
    inp = make_inputs(2, 4, 8, 6, 2, requires_grad=wanted)
    check_against_reference(inp, "torch")


def test_no_grad_inference_and_shared_equals_replicated():
    inp = make_inputs(4, 6, 10, 12, 3, shared_input=True, requires_grad=())
    with torch.no_grad():
        shared = fused_lora_ensemble_linear(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling,
                                            shared_input=True)
        stacked = fused_lora_ensemble_linear(inp.x.repeat(4, 1), inp.weight, inp.bias, inp.lora_A, inp.lora_B,
                                             inp.scaling)
    torch.testing.assert_close(shared, stacked)


def test_gradcheck_float64():
    for shared in (False, True):
        inp = make_inputs(3, 4, 5, 6, 2, dtype=torch.float64, shared_input=shared,
                          requires_grad=("x", "weight", "bias", "lora_A", "lora_B"))

        def fn(x, w, b, a, bb, shared=shared):
            return fused_lora_ensemble_linear(x, w, b, a, bb, 0.3, shared_input=shared, backend="torch")

        assert torch.autograd.gradcheck(fn, (inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B))


def test_unseen_shapes_match_reference():
    """Shapes drawn at random here, not picked by hand."""
    gen = torch.Generator().manual_seed(1234)
    for _ in range(6):
        n, m, d, k, r = (int(torch.randint(lo, hi, (), generator=gen)) for lo, hi in
                         ((1, 9), (1, 40), (1, 90), (1, 90), (1, 40)))
        shared = bool(torch.randint(0, 2, (), generator=gen))
        inp = make_inputs(n, m, d, k, r, shared_input=shared, bias=bool(torch.randint(0, 2, (), generator=gen)))
        check_against_reference(inp, "torch")


def test_nan_propagates():
    inp = make_inputs(2, 3, 8, 5, 2, requires_grad=())
    x = inp.x.clone()
    x[0, 1] = float("nan")
    y = fused_lora_ensemble_linear(x, inp.weight, inp.bias, inp.lora_A, inp.lora_B)
    ref = lora_ensemble_reference(x, inp.weight, inp.bias, inp.lora_A, inp.lora_B)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.isnan(y[0]).any()


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def test_long_input_gradients_within_twice_pytorch_error():
    """Flash-attention's rule on a long input (M = 20000 rows per member): each gradient's error against
    float64 is at most 2x that of PyTorch's autograd of the same composite in fp32 (dB was 12x: its
    reduction over M ran in the order CPU BLAS sums least accurately)."""
    gen = torch.Generator().manual_seed(0)
    n, m, d, k, r = 2, 20000, 64, 48, 8
    x, weight = torch.randn(n * m, d, generator=gen), torch.randn(k, d, generator=gen) / 8
    lora_A, lora_B = torch.randn(n, r, d, generator=gen) / 8, torch.randn(n, k, r, generator=gen) / 8
    grad_out = torch.randn(n * m, k, generator=gen) / m ** 0.5

    def composite(x, A, B):
        rows = x.view(n, m, d)
        return (rows @ weight.to(x.dtype).T + 2.0 * (rows @ A.mT) @ B.mT).view(n * m, k)

    def ours(x, A, B):
        return fused_lora_ensemble_linear(x, weight, None, A, B, 2.0, backend="torch")

    def grads(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, lora_A, lora_B)]
        return torch.autograd.grad(fn(*leaves), leaves, grad_out.to(dtype))

    want = grads(composite, torch.float64)
    for name, got, pytorch, ref in zip(("dx", "dA", "dB"), grads(ours, torch.float32),
                                       grads(composite, torch.float32), want):
        assert _rel_err(got, ref) <= 2 * _rel_err(pytorch, ref), (name, _rel_err(got, ref), _rel_err(pytorch, ref))


# (x, lora_A, lora_B, grad_out) fill values: x A^T = 131072 with an output of about 52; dy B = 1.6e6 with
# dx, dA and dB in range.
BEYOND_FP16 = {"x-A": (16.0, 32.0, 1e-4, 1e-3), "dy-B": (1e-3, 1e-3, 2e3, 1e2)}


@pytest.mark.parametrize("fills", list(BEYOND_FP16.values()), ids=list(BEYOND_FP16))
@pytest.mark.parametrize("shared_input", [False, True], ids=["stacked", "shared"])
def test_fp16_rank_products_beyond_fp16_range_stay_finite(fills, shared_input):
    """A rank-r product beyond fp16's range (65504) where the output and gradients are in range: the
    products are fp32, as in the fused kernels, so out, dx, dA and dB are finite and match float64
    (they were inf: the products were fp16)."""
    n, m, d, k, r = 3, 2, 256, 8, 4
    x_fill, a_fill, b_fill, dy_fill = fills
    x = torch.full((m if shared_input else n * m, d), x_fill)
    weight = torch.randn(k, d) * 0.01
    factors = torch.full((n, r, d), a_fill), torch.full((n, k, r), b_fill)
    grad_out = torch.full((n * m, k), dy_fill)
    results = {}
    for dtype in (torch.float64, torch.float16):
        leaves = [t.to(dtype).requires_grad_() for t in (x, *factors)]
        out = fused_lora_ensemble_linear(leaves[0], weight.to(dtype), None, *leaves[1:], 1.0,
                                         shared_input=shared_input, backend="torch")
        results[dtype] = (out, *torch.autograd.grad(out, leaves, grad_out.to(dtype)))
    for name, got, want in zip(("out", "dx", "dA", "dB"), results[torch.float16], results[torch.float64]):
        assert want.abs().max() < 6e4, f"the test's {name} must be in fp16's range"
        assert torch.isfinite(got).all(), f"{name} has inf/NaN"
        assert _rel_err(got, want) < 1e-2, (name, _rel_err(got, want))


def _composite(x, weight, lora_A, lora_B, shared_input):
    """PyTorch's composite of the op at scaling 0.7: ``[N*M, k]``."""
    n, m = lora_A.shape[0], x.shape[0] if shared_input else x.shape[0] // lora_A.shape[0]
    per = x.unsqueeze(0).expand(n, m, -1) if shared_input else x.view(n, m, -1)
    return (per @ weight.T + 0.7 * (per @ lora_A.mT) @ lora_B.mT).reshape(n * m, -1)


def _ours(x, weight, lora_A, lora_B, shared_input):
    return fused_lora_ensemble_linear(x, weight, None, lora_A, lora_B, 0.7, shared_input=shared_input, backend="torch")


def _out_and_grads(fn, tensors, grad_out, dtype, shared_input):
    """``[out, dx, dA, dB]`` of ``fn`` on ``tensors = (x, W0, A, B)`` in ``dtype``."""
    leaves = [t.to(dtype).requires_grad_(i != 1) for i, t in enumerate(tensors)]
    out = fn(*leaves, shared_input)
    return [out, *torch.autograd.grad(out, [leaves[0], leaves[2], leaves[3]], grad_out.to(dtype))]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("shared_input", [False, True], ids=["stacked", "shared"])
def test_within_twice_pytorch_error_on_random_shapes(dtype, shared_input):
    """Flash-attention's rule: out, dx, dA and dB against float64 within 2x the error of PyTorch's autograd
    of the same composite in ``dtype`` (plus one ulp of the largest entry, for results PyTorch gets exact),
    or within 4 ulps of the largest entry: at these sizes both are a few roundings off (0.5-4 ulps), and
    which is nearer depends on the CPU's BLAS kernels (e.g. dB of N3 M2 d197 k88 r8, shared, fp32: ours
    2.2 ulps, PyTorch's 0.5 on an Intel Xeon with AVX-512)."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        n, m, d, k, r = (int(torch.randint(lo, hi, (), generator=gen)) for lo, hi in
                         ((1, 5), (1, 60), (1, 200), (1, 200), (1, 40)))
        r = min(r, d, k)
        tensors = [torch.randn(m if shared_input else n * m, d, generator=gen),
                   torch.randn(k, d, generator=gen) / d ** 0.5, torch.randn(n, r, d, generator=gen) / d ** 0.5,
                   torch.randn(n, k, r, generator=gen) / r ** 0.5]
        grad_out = torch.randn(n * m, k, generator=gen)
        results = [_out_and_grads(fn, tensors, grad_out, dt, shared_input)
                   for fn, dt in ((_ours, dtype), (_composite, dtype), (_composite, torch.float64))]
        for name, got, pytorch, ref in zip(("out", "dx", "dA", "dB"), *results):
            ulp = torch.finfo(dtype).eps * ref.abs().max().item()
            err = (got.double() - ref).abs().max().item()
            bound = max(2 * (pytorch.double() - ref).abs().max().item() + ulp, 4 * ulp)
            assert err <= bound, (name, (n, m, d, k, r), err, bound)
