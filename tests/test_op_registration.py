"""The registered op: opcheck, torch.compile(fullgraph=True) with no graph break, import hygiene."""

import subprocess
import sys

import pytest
import torch

import lora_ensemble  # noqa: F401  (registers the ops)
from lora_ensemble import FusedLoRAEnsembleLinear

from .utils import make_inputs


def _samples():
    for shared in (False, True):
        for bias in (True, False):
            inp = make_inputs(3, 5, 12, 10, 2, shared_input=shared, bias=bias,
                              requires_grad=("x", "weight", "lora_A", "lora_B"))
            x = inp.x if shared else inp.x.reshape(3, -1, 12)
            yield (x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, 0.5, shared, "torch")


@pytest.mark.parametrize("args", list(_samples()), ids=["stacked-bias", "stacked", "shared-bias", "shared"])
def test_opcheck_fused_linear(args):
    torch.library.opcheck(torch.ops.lora_ensemble.fused_linear.default, args)


def test_opcheck_backward_op():
    inp = make_inputs(2, 4, 8, 6, 3, requires_grad=())
    x = inp.x.reshape(2, -1, 8)
    xa = torch.bmm(x, inp.lora_A.transpose(1, 2))
    grad_out = torch.randn(2, 4, 6)
    for need_dx, need_lora in ((True, True), (False, True), (True, False), (False, False)):
        torch.library.opcheck(torch.ops.lora_ensemble.fused_linear_backward.default,
                              (grad_out, x, inp.weight, inp.lora_A, inp.lora_B, xa, 0.5, False, "torch",
                               need_dx, need_lora))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        FusedLoRAEnsembleLinear(16, 24, num_members=4, rank=3, alpha=3.0, backend="torch"),
        torch.nn.GELU(),
        FusedLoRAEnsembleLinear(24, 8, num_members=4, rank=3, backend="torch"),
    )
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.lora_B.normal_()
    x = torch.randn(4 * 2, 5, 16)
    eager = model(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for g, e in zip([p.grad for p in model.parameters() if p.requires_grad], eager_grads):
        torch.testing.assert_close(g, e)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_import_touches_no_cuda_nor_extension():
    code = ("import sys, torch, lora_ensemble; "
            "assert 'lora_ensemble._C' not in sys.modules, '_C loaded'; "
            "assert 'lora_ensemble.kernels' not in sys.modules, 'Triton kernels imported'; "
            "assert not torch.cuda.is_initialized(), 'cuda initialised'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_eager_calls_skip_the_custom_op_and_compiled_graphs_hold_it(monkeypatch):
    """Eager calls run the backend through an autograd.Function (no custom-op dispatch: ~20 µs a call),
    or with no gradient to record the backend alone; torch.compile traces the registered op. Both give
    the same values and gradients."""
    import lora_ensemble.ops as ops

    layer = FusedLoRAEnsembleLinear(12, 10, num_members=3, rank=2, backend="torch")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3 * 2, 12, requires_grad=True)
    compiled_out = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    compiled_grads = torch.autograd.grad(compiled_out.sum(), (x, layer.lora_A, layer.lora_B))

    def refuse(*args, **kwargs):
        raise AssertionError("the eager path went through the custom op")

    monkeypatch.setattr(ops, "fused_linear", refuse)
    out = layer(x)
    assert type(out.grad_fn.next_functions[0][0]).__name__ == "FusedLinearFunctionBackward"  # under a view
    grads = torch.autograd.grad(out.sum(), (x, layer.lora_A, layer.lora_B))
    torch.testing.assert_close(out, compiled_out)
    for got, want in zip(grads, compiled_grads):
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        assert layer(x).grad_fn is None
    assert layer(x.detach()).grad_fn is not None  # the LoRA factors still require grad
