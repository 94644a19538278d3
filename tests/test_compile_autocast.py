"""torch.compile, CUDA-graph capture and torch.autocast through the fused op.

Every compiled or autocast result is checked against the float64 reference
(:mod:`lora_ensemble.reference`) and, for compiled code, against eager. Inductor compiles cost
~20 s on two CPU cores, so only one test uses it; the others trace with ``aot_eager``, which runs
the same Dynamo capture, fake-tensor propagation and AOT autograd without generating code.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounter

from lora_ensemble import FusedLoRAEnsembleLinear, LoRAEnsemble, available_backends, fused_lora_ensemble_linear
from lora_ensemble.backends import unavailable_reason
from lora_ensemble.reference import lora_ensemble_reference, lora_ensemble_reference_backward

from .utils import TOLERANCES, assert_close_named, make_inputs

CPU_BACKENDS = available_backends("cpu")
FUSED_BACKENDS = ("triton", "cuda")


def _random_lora(layer: FusedLoRAEnsembleLinear, std: float | None = None) -> FusedLoRAEnsembleLinear:
    """Give ``lora_B`` random values: with the default zero init the LoRA path would be invisible."""
    with torch.no_grad():
        layer.lora_B.normal_(0.0, layer.rank**-0.5 if std is None else std)
    return layer


def _two_layer_model(backend: str, device: str = "cpu") -> nn.Sequential:
    return nn.Sequential(
        _random_lora(FusedLoRAEnsembleLinear(24, 40, 3, 4, alpha=8.0, backend=backend, device=device)),
        nn.GELU(),
        nn.LayerNorm(40, device=device),
        _random_lora(FusedLoRAEnsembleLinear(40, 10, 3, 1, bias=False, backend=backend, device=device)),
    )


def _wrapped_vit(**options) -> LoRAEnsemble:
    """A LoRA-Ensemble of a tiny timm ViT (3 members) with random ``lora_B``, small enough that the
    gain-10 ``lora_A`` does not saturate the attention softmax (which would amplify rounding)."""
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    ensemble = LoRAEnsemble(vit, num_members=3, rank=2, **options)
    for layer in ensemble.lora_layers().values():
        _random_lora(layer, std=0.02)
    return ensemble


def _lora_grads(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _run_fwd_bwd(fn, model: nn.Module, x: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out = fn(x)
    out.backward(grad_out)
    return out.detach(), x.grad, _lora_grads(model)


def _assert_matches_eager(compiled_fn, model: nn.Module, x: Tensor) -> None:
    eager_out = model(x)
    grad_out = torch.randn_like(eager_out)
    want_out, want_dx, want_grads = _run_fwd_bwd(model, model, x, grad_out)
    got_out, got_dx, got_grads = _run_fwd_bwd(compiled_fn, model, x, grad_out)
    assert_close_named("out", got_out, want_out, torch.float32)
    assert_close_named("dx", got_dx, want_dx, torch.float32)
    assert want_grads.keys() == got_grads.keys() and want_grads, f"grads: {sorted(got_grads)} vs {sorted(want_grads)}"
    for name, want in want_grads.items():
        assert_close_named(f"d{name}", got_grads[name], want, torch.float32)


def test_dynamo_sees_one_graph_without_breaks() -> None:
    model = _two_layer_model("auto")
    x = torch.randn(3 * 2, 5, 24)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    ops = [str(node.target) for graph in explanation.graphs for node in graph.graph.nodes]
    assert sum("lora_ensemble.fused_linear" in op for op in ops) == 2, ops


def test_inductor_fullgraph_matches_eager_forward_and_backward() -> None:
    torch._dynamo.reset()
    model = _two_layer_model("auto")
    compiled = torch.compile(model, fullgraph=True)
    _assert_matches_eager(compiled, model, torch.randn(3 * 4, 7, 24))


@pytest.mark.parametrize("options", [{}, {"replicate_at": "blocks"}, {"share_first_input": True}],
                         ids=["replicate-at-entry", "replicate-at-blocks", "share-first-input"])
def test_compiled_wrapped_model_has_one_graph_and_matches_eager(options: dict) -> None:
    torch._dynamo.reset()
    ensemble = _wrapped_vit(**options)
    counter = CompileCounter()
    aot_eager_counted = torch.compile(ensemble, fullgraph=True, backend="aot_eager")
    counted = torch.compile(ensemble, fullgraph=True, backend=counter)
    x = torch.randn(2, 3, 16, 16)
    counted(x)
    assert counter.frame_count == 1 and counter.op_count > 0
    _assert_matches_eager(aot_eager_counted, ensemble, x)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shared_input", [False, True])
def test_compiled_functional_matches_reference(backend: str, shared_input: bool) -> None:
    torch._dynamo.reset()
    inp = make_inputs(num_members=3, rows=10, d=19, k=13, rank=3, shared_input=shared_input, lead=(2, 5),
                      noncontiguous=True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(x, weight, bias, lora_A, lora_B):
        return fused_lora_ensemble_linear(x, weight, bias, lora_A, lora_B, inp.scaling,
                                          shared_input=shared_input, backend=backend)

    out = fn(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B)
    ref = lora_ensemble_reference(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling, shared_input)
    assert_close_named("out", out, ref, torch.float32)
    grad_out = torch.randn_like(out)
    dx, dA, dB = torch.autograd.grad(out, [inp.x, inp.lora_A, inp.lora_B], grad_out)
    ref_grads = lora_ensemble_reference_backward(grad_out, inp.x, inp.weight, inp.lora_A, inp.lora_B, inp.scaling,
                                                 shared_input)
    assert_close_named("dx", dx, ref_grads.x, torch.float32)
    assert_close_named("dlora_A", dA, ref_grads.lora_A, torch.float32)
    assert_close_named("dlora_B", dB, ref_grads.lora_B, torch.float32)


def test_compiled_trainable_base_weight_gets_its_gradient() -> None:
    torch._dynamo.reset()
    inp = make_inputs(num_members=2, rows=6, d=9, k=5, rank=1,
                      requires_grad=("x", "weight", "bias", "lora_A", "lora_B"))
    fn = torch.compile(fused_lora_ensemble_linear, fullgraph=True, backend="aot_eager")
    out = fn(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling)
    grad_out = torch.randn_like(out)
    dW, db = torch.autograd.grad(out, [inp.weight, inp.bias], grad_out)
    ref_grads = lora_ensemble_reference_backward(grad_out, inp.x, inp.weight, inp.lora_A, inp.lora_B, inp.scaling)
    assert_close_named("dweight", dW, ref_grads.weight, torch.float32)
    assert_close_named("dbias", db, ref_grads.bias, torch.float32)


def test_compiled_dynamic_batch_does_not_recompile() -> None:
    torch._dynamo.reset()
    layer = _random_lora(FusedLoRAEnsembleLinear(16, 8, 4, 2))
    counter = CompileCounter()
    compiled = torch.compile(layer, fullgraph=True, backend=counter, dynamic=True)
    for bsz in (2, 3, 5):  # Bsz=1 would be specialised (size-1 dims always are)
        x = torch.randn(4 * bsz, 16)
        out = compiled(x)
        ref = lora_ensemble_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
        assert_close_named(f"out (Bsz={bsz})", out, ref, torch.float32)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for 3 batch sizes"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared_input", [False, True])
def test_cpu_autocast_runs_in_autocast_dtype(dtype: torch.dtype, shared_input: bool) -> None:
    # d = 512: a long reduction; summed element by element in bf16 it errs by ~10% of the RMS (measured),
    # five times the tolerance, so passing needs wider accumulation.
    layer = _random_lora(FusedLoRAEnsembleLinear(512, 24, 3, 5, alpha=10.0))
    x = torch.randn(2, 7, 512) if shared_input else torch.randn(3 * 2, 7, 512)
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        out = layer(x, shared_input=shared_input)
    assert out.dtype == dtype
    low = [t.detach().to(dtype) for t in (x, layer.weight, layer.bias, layer.lora_A, layer.lora_B)]
    ref = lora_ensemble_reference(*low, layer.scaling, shared_input)
    assert_close_named("out", out, ref, dtype)

    grad_out = torch.randn_like(out)
    dx, dA, dB = torch.autograd.grad(out, [x, layer.lora_A, layer.lora_B], grad_out)
    assert (dx.dtype, dA.dtype, dB.dtype) == (torch.float32,) * 3, "grads must come back in the parameters' dtype"
    ref_grads = lora_ensemble_reference_backward(grad_out, low[0], low[1], low[3], low[4], layer.scaling,
                                                 shared_input)
    assert_close_named("dx", dx, ref_grads.x, dtype)
    assert_close_named("dlora_A", dA, ref_grads.lora_A, dtype)
    assert_close_named("dlora_B", dB, ref_grads.lora_B, dtype)


def test_autocast_takes_low_precision_activations_with_fp32_parameters() -> None:
    layer = _random_lora(FusedLoRAEnsembleLinear(40, 12, 2, 3))
    x = torch.randn(2 * 3, 40).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    low = [t.detach().to(torch.bfloat16) for t in (layer.weight, layer.bias, layer.lora_A, layer.lora_B)]
    assert_close_named("out", out, lora_ensemble_reference(x, *low, layer.scaling), torch.bfloat16)


def test_wrapped_model_under_autocast_gives_autocast_logits() -> None:
    ensemble = _wrapped_vit(replicate_at="blocks")
    x = torch.randn(2, 3, 16, 16)
    want = ensemble(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ensemble(x)
    assert got.dtype == torch.bfloat16
    assert_close_named("logits", got, want.double(), torch.bfloat16, (5e-2, 5e-2))


def test_compiled_under_autocast_matches_eager_autocast() -> None:
    torch._dynamo.reset()
    model = _two_layer_model("auto")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3 * 2, 4, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(x)
        got = compiled(x)
    assert got.dtype == eager.dtype
    assert_close_named("out", got, eager.double(), torch.bfloat16)


# --- CUDA ---------------------------------------------------------------------------------------


def _require_cuda_backend(backend: str) -> None:
    reason = unavailable_reason(backend, "cuda")
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_cuda_graph_capture_replays_forward_and_backward(backend: str) -> None:
    _require_cuda_backend(backend)
    layer = _random_lora(FusedLoRAEnsembleLinear(96, 80, 4, 8, backend=backend, device="cuda"))
    static_x = torch.randn(4 * 6, 96, device="cuda", requires_grad=True)
    static_grad = torch.randn(4 * 6, 80, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (lazy init, Triton compilation) outside the capture
        for _ in range(2):
            layer(static_x).backward(static_grad)
    torch.cuda.current_stream().wait_stream(side)
    layer.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x)
        static_out.backward(static_grad)

    for _ in range(2):  # fresh data each replay: the graph must read the static buffers, not stale ones
        with torch.no_grad():
            static_x.copy_(torch.randn_like(static_x))
            static_grad.copy_(torch.randn_like(static_grad))
        graph.replay()
        torch.cuda.synchronize()
        ref = lora_ensemble_reference(static_x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
        ref_grads = lora_ensemble_reference_backward(static_grad, static_x, layer.weight, layer.lora_A, layer.lora_B,
                                                     layer.scaling)
        tol = (2e-3, 2e-3)  # fp32 GEMMs may run as TF32 on the GPU
        assert_close_named("out", static_out, ref, torch.float32, tol)
        assert_close_named("dx", static_x.grad, ref_grads.x, torch.float32, tol)
        assert_close_named("dlora_A", layer.lora_A.grad, ref_grads.lora_A, torch.float32, tol)
        assert_close_named("dlora_B", layer.lora_B.grad, ref_grads.lora_B, torch.float32, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_compile_reduce_overhead_matches_eager_on_cuda(backend: str) -> None:
    _require_cuda_backend(backend)
    torch._dynamo.reset()
    model = _two_layer_model(backend, device="cuda")
    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # the CUDA graph is recorded on a later call than the first
        x = torch.randn(3 * 8, 16, 24, device="cuda")
        with torch.no_grad():
            got = compiled(x).clone()
            want = model(x)
        assert_close_named("out", got, want.double(), torch.float32, (2e-3, 2e-3))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_decode_under_reduce_overhead_splits_k_and_matches_float64(backend: str) -> None:
    """Llama-7B-class q_proj decode (16 members x 1 row, 4096 -> 4096, rank 16, bf16) under
    ``torch.compile(mode="reduce-overhead")``, as LLM decoding runs it: both fused backends split K
    there (each call's workspace and zeroed arrival counts allocated inside the recorded graph), and
    the replays match float64 on fresh inputs every call."""
    from lora_ensemble.kernels import fused_lora_gemm

    _require_cuda_backend(backend)
    torch._dynamo.reset()
    layer = _random_lora(FusedLoRAEnsembleLinear(4096, 4096, 16, 16, backend=backend, device="cuda",
                                                 dtype=torch.bfloat16))
    compiled = torch.compile(layer, fullgraph=True, mode="reduce-overhead")
    for _ in range(4):  # the CUDA graph is recorded on a later call than the first, then replayed
        x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            got = compiled(x).clone()
        want = lora_ensemble_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
        assert_close_named("out", got, want, torch.bfloat16, TOLERANCES[torch.bfloat16])
    if backend == "triton" and torch.cuda.get_device_properties(0).multi_processor_count >= 2 * 32:
        assert fused_lora_gemm._STACKED_SPLIT_K.tunings, "the decode launch did not split K"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_reduce_overhead_wrapped_vit_replays_as_cuda_graphs(backend: str) -> None:
    """A whole wrapped ViT under torch.compile(mode="reduce-overhead"): inference and a training step
    run as CUDA-graph replays (inductor records no cudagraph skip) and match eager."""
    from torch._dynamo.utils import counters

    _require_cuda_backend(backend)
    torch._dynamo.reset()
    counters.clear()
    ensemble = _wrapped_vit(backend=backend).cuda()
    compiled = torch.compile(ensemble, mode="reduce-overhead")
    images = torch.randn(2, 3, 16, 16, device="cuda")
    with torch.no_grad():
        want = ensemble(images)
        for _ in range(3):  # recorded on a later call than the first
            got = compiled(images).clone()
    assert_close_named("logits", got, want.double(), torch.float32, (2e-3, 2e-3))
    for _ in range(3):
        loss = compiled(images).float().logsumexp(-1).sum()
        loss.backward()
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"]["cudagraph_skips"])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_reduce_overhead_wrapped_llm_replays_as_cuda_graphs(backend: str) -> None:
    """A wrapped Llama's member logits under torch.compile(mode="reduce-overhead"): CUDA-graph replays
    (no cudagraph skip), the same logits as eager."""
    from torch._dynamo.utils import counters

    from .hf_tiny import causal_lm

    _require_cuda_backend(backend)
    torch._dynamo.reset()
    counters.clear()
    ensemble = LoRAEnsemble(causal_lm("llama").float().cuda(), num_members=3, rank=4, backend=backend)
    for layer in ensemble.lora_layers().values():
        _random_lora(layer, std=0.05)
    compiled = torch.compile(ensemble, mode="reduce-overhead")
    ids = torch.randint(3, 64, (2, 7), device="cuda")
    with torch.no_grad():
        want = ensemble(ids)
        for _ in range(3):
            got = compiled(ids).clone()
    assert_close_named("logits", got, want.double(), torch.float32, (2e-3, 2e-3))
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"]["cudagraph_skips"])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_runs_in_autocast_dtype(backend: str, dtype: torch.dtype) -> None:
    _require_cuda_backend(backend)
    layer = _random_lora(FusedLoRAEnsembleLinear(1024, 96, 4, 16, backend=backend, device="cuda"))
    x = torch.randn(4 * 8, 33, 1024, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        out = layer(x)
    assert out.dtype == dtype
    low = [t.detach().to(dtype) for t in (x, layer.weight, layer.bias, layer.lora_A, layer.lora_B)]
    assert_close_named("out", out, lora_ensemble_reference(*low, layer.scaling), dtype, TOLERANCES[dtype])
    grad_out = torch.randn_like(out)
    dA, dB = torch.autograd.grad(out, [layer.lora_A, layer.lora_B], grad_out)
    assert dA.dtype == dB.dtype == torch.float32
    ref_grads = lora_ensemble_reference_backward(grad_out, low[0], low[1], low[3], low[4], layer.scaling)
    assert_close_named("dlora_A", dA, ref_grads.lora_A, dtype)
    assert_close_named("dlora_B", dB, ref_grads.lora_B, dtype)
