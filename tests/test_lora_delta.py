"""``lora_ensemble_delta``: every member's low-rank update over the output of a base layer the kernels
cannot read (a quantized one), ``base + s (x A^T) B^T``, against float64, with its gradients."""

from __future__ import annotations

import pytest
import torch

from lora_ensemble import available_backends, lora_ensemble_delta
from lora_ensemble.reference import lora_delta_reference, lora_delta_reference_backward

from .utils import TOLERANCES, assert_close_named

CPU_BACKENDS = available_backends("cpu")

# (N, rows per member, d, k, r, dtype, shared_input, lead)
CASES = [
    (3, 7, 20, 36, 5, torch.float32, False, None),
    (3, 7, 20, 36, 5, torch.float32, True, None),
    (1, 1, 9, 12, 1, torch.float32, False, None),  # one member, one row, rank 1
    (2, 6, 17, 33, 33, torch.float16, False, (2, 3)),  # 3-D input, rank tile 64
    (4, 5, 16, 24, 4, torch.float16, True, (5,)),
    (2, 9, 40, 24, 3, torch.float64, False, None),
    (2, 1030, 19, 21, 5, torch.float32, False, None),  # Triton: member tiles, 9 a member, the last padded
]


def _inputs(n, m, d, k, r, dtype, shared, lead):
    lead = lead or (m,)
    x_lead = lead if shared else (n * lead[0], *lead[1:])
    x = torch.randn(*x_lead, d).to(dtype).requires_grad_()
    base = torch.randn(*x_lead, k).to(dtype).requires_grad_()
    lora_A = (torch.randn(n, r, d) * d**-0.5).to(dtype).requires_grad_()
    lora_B = (torch.randn(n, k, r) * r**-0.5).to(dtype).requires_grad_()
    return x, base, lora_A, lora_B


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: (f"N{c[0]}-M{c[1]}-d{c[2]}-k{c[3]}-r{c[4]}-{str(c[5])[6:]}"
                                                       f"{'-shared' if c[6] else ''}"
                                                       f"{'-3d' if c[7] and len(c[7]) > 1 else ''}"))
def test_matches_float64_with_gradients(case, backend):
    n, m, d, k, r, dtype, shared, lead = case
    if dtype == torch.float64 and backend != "torch":
        pytest.skip("float64 runs on the torch backend only")
    s = 0.7
    x, base, lora_A, lora_B = _inputs(*case)
    out = lora_ensemble_delta(x, base, lora_A, lora_B, s, shared_input=shared, backend=backend)
    want = lora_delta_reference(x, base, lora_A, lora_B, s, shared)
    rows = n * x.shape[0] if shared else x.shape[0]
    assert out.shape == want.shape == (rows, *x.shape[1:-1], k)
    assert_close_named("out", out, want, dtype)

    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, base, lora_A, lora_B), dy)
    want_grads = lora_delta_reference_backward(dy, x, lora_A, lora_B, s, shared)
    for name, got in zip(("x", "base", "lora_A", "lora_B"), grads):
        assert got.dtype == dtype
        assert_close_named(f"d{name}", got, getattr(want_grads, name), dtype)


def test_adapters_in_their_own_dtype_are_cast_to_the_compute_dtype():
    x, base, lora_A, lora_B = _inputs(2, 5, 12, 10, 3, torch.float32, False, None)
    low = lora_ensemble_delta(x.bfloat16(), base.bfloat16(), lora_A, lora_B, 0.5, backend="torch")
    assert low.dtype == torch.bfloat16
    grad_A = torch.autograd.grad(low.float().sum(), lora_A)[0]
    assert grad_A.dtype == torch.float32
    want = lora_delta_reference(x.bfloat16(), base.bfloat16(), lora_A.bfloat16(), lora_B.bfloat16(), 0.5, False)
    assert_close_named("out", low, want, torch.bfloat16, TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize(("override", "exc", "words"), [
    ({"base": torch.randn(6, 11)}, ValueError, ["base shape (6, 11)", "(6, 10)"]),
    ({"base": torch.randn(6, 10, dtype=torch.float64)}, TypeError, ["one dtype", "base"]),
    ({"x": torch.randn(5, 12)}, ValueError, ["leading dim 5", "N=2"]),
    ({"lora_A": torch.randn(2, 3)}, ValueError, ["lora_A must be 3-D"]),
    ({"lora_B": torch.randn(2, 10, 4)}, ValueError, ["lora_B shape (2, 10, 4)", "(2, 10, 3)"]),
    ({"lora_B": torch.randn(2, 9, 3)}, ValueError, ["base shape (6, 10)", "lora_B shape (2, 9, 3)"]),
], ids=["base-shape", "base-dtype", "batch", "A-dims", "B-rank", "B-width"])
def test_bad_input_is_named_and_nothing_is_modified(override, exc, words):
    args = dict(x=torch.randn(6, 12), base=torch.randn(6, 10), lora_A=torch.randn(2, 3, 12),
                lora_B=torch.randn(2, 10, 3))
    args.update(override)
    before = {k: v.clone() for k, v in args.items()}
    with pytest.raises(exc) as info:
        lora_ensemble_delta(**args, backend="torch")
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
    for name, value in args.items():
        assert torch.equal(value, before[name]), f"{name} was modified"


def test_registered_op_passes_opcheck_and_compiles_without_breaks():
    x, base, lora_A, lora_B = _inputs(3, 4, 12, 10, 2, torch.float32, False, None)
    args = (x.detach().reshape(3, 4, 12).requires_grad_(), base.detach().reshape(3, 4, 10).requires_grad_(),
            lora_A, lora_B, 0.5, False, "torch")
    torch.library.opcheck(torch.ops.lora_ensemble.lora_delta.default, args)
    shared = (x.detach()[:4].requires_grad_(), base.detach()[:4].requires_grad_(), lora_A, lora_B, 0.5, True, "torch")
    torch.library.opcheck(torch.ops.lora_ensemble.lora_delta.default, shared)

    def fn(x, base):
        return lora_ensemble_delta(x, base, lora_A, lora_B, 0.5, backend="torch")

    explanation = torch._dynamo.explain(fn)(x, base)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, base), fn(x, base))
