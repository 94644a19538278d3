"""``backend="auto"``: per shape class, the composite among the candidates, a decision stored, measured or
modelled, one dictionary lookup per later call, visible in a debug log and a listing.

On a CPU ``auto`` has one candidate (``torch``); the tests give it the Triton interpreter as a second
one (``TRITON_INTERPRET=1``, set by conftest) to run the per-shape machinery here."""

from __future__ import annotations

import logging

import pytest
import torch

from lora_ensemble import auto_backend as ab
from lora_ensemble import backends, functional, tuning_store
from lora_ensemble.auto_costs import (
    HEADLINE_SHAPES,
    HOST_SECONDS,
    ShapeClass,
    estimate_backend,
    format_estimates,
    rows_bucket,
)
from lora_ensemble.kernels.gpu_specs import H100_SXM, gpu_spec
from lora_ensemble.reference import lora_ensemble_reference

CPU = torch.device("cpu")


def shape(**overrides) -> ShapeClass:
    fields = dict(op="linear", dtype=torch.bfloat16, members=16, rows=64, d=768, k=768, rank=8, shared=False,
                  grad=False)
    return ShapeClass(**{**fields, **overrides})


def inputs(n=3, m=5, d=12, k=10, r=2, grad=True):
    x = torch.randn(n * m, d, requires_grad=grad)
    w, b = torch.randn(k, d) / d**0.5, torch.randn(k)
    a = (torch.randn(n, r, d) / d**0.5).requires_grad_(grad)
    bb = torch.randn(n, k, r).requires_grad_(grad)
    return x, w, b, a, bb


def test_candidates_off_the_gpu_are_the_composite_alone():
    assert backends.auto_candidates("cpu", torch.float32) == ("torch",)
    assert backends.resolve_backend("auto", "cpu", torch.float32, defer_auto=True) == "torch"
    assert backends.resolve_backend("auto", "cpu", torch.float64) == "torch"


def test_shape_class_key_and_rows_bucket():
    assert [rows_bucket(m) for m in (0, 1, 2, 3, 50, 64, 65)] == [1, 1, 2, 4, 64, 64, 128]
    assert ab.shape_class("linear", torch.bfloat16, 16, 50, 768, 768, 8, False, True) == shape(grad=True)
    assert shape(shared=True).key() == "linear bfloat16 N16 M64 d768 k768 r8 shared fwd"


def test_model_weighs_host_time_in_eager_mode_and_device_time_when_compiled(fresh_auto, monkeypatch):
    monkeypatch.setenv(ab.PIN_VARIABLE, "0")
    for case in (shape(), shape(rows=1, d=4096, k=4096, rank=16), shape(rows=2048, grad=True)):
        estimates = {name: estimate_backend(name, case, H100_SXM) for name in ("triton", "torch")}
        eager = ab.decide(CPU, case, ("triton", "torch"))
        compiled = ab.decide(CPU, case, ("triton", "torch"), compiled=True)
        assert eager.source == compiled.source == "model"
        assert eager.backend == min(estimates, key=lambda n: estimates[n].eager_s)
        assert compiled.backend == min(estimates, key=lambda n: estimates[n].device_s)
        assert eager.times_us["torch"] == pytest.approx(estimates["torch"].eager_s * 1e6)
    # Llama-7B decode (16 members x 1 row): the fused kernel reads W0 once (one 16-row tile) and splits
    # K to fill the SMs; by the model a little under the composite on the device, behind it on the host.
    decode = shape(rows=1, d=4096, k=4096, rank=16)
    assert ab.decide(CPU, decode, ("triton", "torch"), compiled=True).backend == "triton"
    assert ab.decide(CPU, decode, ("triton", "torch")).backend == "triton"
    # Host cost counts in eager mode only: a batch-1 layer is host-bound there.
    assert HOST_SECONDS["torch"]["fwd"] > 0 and "max(host, device)" in ab.decide(CPU, shape(),
                                                                                  ("triton", "torch")).why()


def test_estimates_table_has_a_row_per_shape_with_the_models_choices():
    lines = format_estimates(H100_SXM).splitlines()
    rows = lines[4:]
    assert len(rows) == len(HEADLINE_SHAPES)
    for (label, case), row in zip(HEADLINE_SHAPES, rows):
        cells = [c.strip() for c in row.strip("|").split("|")]
        estimates = {b: estimate_backend(b, case, H100_SXM) for b in ("torch", "triton", "cuda")}
        assert cells[0] == f"{label} ({case.key()})"
        assert cells[4] == min(estimates, key=lambda b: estimates[b].eager_s)
        assert cells[5] == min(estimates, key=lambda b: estimates[b].device_s)


# The model's choice on an H100 (kernels/gpu_specs.py) per headline shape, eager and under a compiled
# graph, as benchmarks/NOTES.md predicts: the fused Triton kernels where the device time is theirs (ViT
# batch 32: W0 once per 128-row tile, one launch against the composite's four; "Row tiles that span
# members"), the composite at prefill (Triton predicted 13% slower, CUDA's WMMA at half of cuBLAS's
# rate: the issue-21 CUDA section), split-K Triton at decode under a graph (W0 once in one 16-row
# tile, 4 ranges of K: 18.0 µs against CUDA's 18.3 and the composite's 19.8), never CUDA from 16 rows a
# member on. At batch 1 every backend is host-bound
# in eager mode: the choice follows HOST_SECONDS (within ~3 µs of each other).
def headline(rows: int, grad: bool = False, llama: bool = False) -> ShapeClass:
    """The class ``auto`` files a call under (rows per member in their power-of-two bucket)."""
    d, rank = (4096, 16) if llama else (768, 8)
    return ab.shape_class("linear", torch.bfloat16, 16, rows, d, d, rank, False, grad)


HEADLINE_CHOICES = {  # shape: (eager, compiled)
    headline(1600, grad=True): ("triton", "triton"),
    headline(1600): ("triton", "triton"),
    headline(50, grad=True): ("triton", "triton"),
    headline(50): ("cuda", "triton"),
    headline(1, llama=True): ("cuda", "triton"),
    headline(16, llama=True): ("triton", "torch"),  # host-bound eager; on device the composite by 4 µs
    headline(512, llama=True): ("torch", "torch"),
}


@pytest.mark.parametrize("case", list(HEADLINE_CHOICES), ids=lambda case: case.key())
def test_model_picks_per_headline_shape_on_an_h100_as_the_notes_predict(fresh_auto, monkeypatch, case):
    assert gpu_spec(CPU) is H100_SXM  # what the model assumes off a GPU
    monkeypatch.setenv(ab.PIN_VARIABLE, "0")  # the model alone
    candidates = ("triton", "cuda", "torch")
    eager = ab.decide(CPU, case, candidates)
    compiled = ab.decide(CPU, case, candidates, compiled=True)
    assert (eager.backend, compiled.backend) == HEADLINE_CHOICES[case], (eager.why(), compiled.why())
    assert "NVIDIA H100" in eager.why() and "max(host, device)" in eager.why()
    assert "device time" in compiled.why()
    # Never slower than the composite, by the model.
    assert eager.times_us[eager.backend] <= eager.times_us["torch"]
    assert compiled.times_us[compiled.backend] <= compiled.times_us["torch"]


def test_without_split_k_the_model_prices_the_unsplit_kernel_at_decode(fresh_auto, monkeypatch):
    """``LORA_ENSEMBLE_TRITON_SPLIT_K=0``: no split-K tiling is offered, so at decode the model prices the
    unsplit Triton kernel (22.4 µs, latency-bound: slower than the composite and CUDA) and ``auto``
    under a compiled graph goes back to CUDA."""
    from lora_ensemble.tuning_store import SPLIT_K_VARIABLE

    monkeypatch.setenv(ab.PIN_VARIABLE, "0")
    decode = headline(1, llama=True)
    split = estimate_backend("triton", decode, H100_SXM).device_s
    monkeypatch.setenv(SPLIT_K_VARIABLE, "0")
    unsplit = estimate_backend("triton", decode, H100_SXM).device_s
    assert unsplit > estimate_backend("torch", decode, H100_SXM).device_s > split
    assert ab.decide(CPU, decode, ("triton", "cuda", "torch"), compiled=True).backend == "cuda"


def test_measured_and_stored_choices_override_the_model(fresh_auto):
    prefill = headline(512, llama=True)  # the model: the composite
    assert ab.decide(CPU, prefill, ("triton", "torch"), compiled=True).backend == "torch"
    measured = ab.decide(CPU, prefill, ("triton", "torch"), lambda: {"triton": fast, "torch": slow})
    assert (measured.backend, measured.source) == ("triton", "measured")
    decode = headline(1, llama=True)  # the model: cuda
    tuning_store.tuning_store(CPU).record_auto_choice(decode.key(), "torch", {"torch": 1.0, "cuda": 2.0})
    stored = ab.decide(CPU, decode, ("triton", "cuda", "torch"), lambda: pytest.fail("measured a stored shape"))
    assert (stored.backend, stored.source) == ("torch", "stored")


def fast() -> None:
    torch.ones(4).sum()


def slow() -> None:
    for _ in range(200):
        torch.ones(4).sum()


def test_measured_choice_is_the_fastest_and_is_stored_for_the_next_process(fresh_auto):
    decision = ab.decide(CPU, shape(), ("a", "b"), lambda: {"a": slow, "b": fast})
    assert (decision.backend, decision.source) == ("b", "measured")
    assert decision.times_us["a"] > decision.times_us["b"] > 0
    fresh_auto()  # a new process: the stored choice, nothing measured
    again = ab.decide(CPU, shape(), ("a", "b"), lambda: pytest.fail("measured again"))
    assert (again.backend, again.source) == ("b", "stored")
    assert again.times_us == decision.times_us


def test_a_failing_candidate_is_left_out_and_named(fresh_auto):
    def broken() -> None:
        raise RuntimeError("no kernel image")

    decision = ab.decide(CPU, shape(), ("a", "b"), lambda: {"a": broken, "b": slow})
    assert decision.backend == "b" and "a failed: RuntimeError: no kernel image" in decision.why()


@pytest.mark.parametrize("how", ["pin", "deterministic", "no measuring"])
def test_pinned_or_unmeasured_decisions_come_from_the_model(fresh_auto, monkeypatch, request, how):
    tuning_store.tuning_store(CPU).record_auto_choice(shape().key(), "torch", {"torch": 1.0})
    if how == "pin":
        monkeypatch.setenv(ab.PIN_VARIABLE, "0")
    elif how == "deterministic":
        torch.use_deterministic_algorithms(True)
        request.addfinalizer(lambda: torch.use_deterministic_algorithms(False))
    else:
        monkeypatch.setenv(ab.MEASURE_VARIABLE, "0")
        tuning_store._store.cache_clear()
        monkeypatch.setenv(tuning_store.CACHE_DIR_VARIABLE, "")  # nothing stored either
    decision = ab.decide(CPU, shape(), ("triton", "torch"), lambda: pytest.fail("measured while pinned"))
    assert decision.source == "model"
    assert ("tuning pinned" in decision.why()) == (how != "no measuring")


def test_auto_runs_the_op_through_the_chosen_backend_and_then_only_looks_up(two_candidates, monkeypatch, caplog):
    x, w, b, a, bb = inputs()
    with caplog.at_level(logging.DEBUG, logger="lora_ensemble.auto"):
        out = functional.fused_lora_ensemble_linear(x, w, b, a, bb, 0.5, backend="auto")
    (decision,) = ab.auto_decisions()
    assert decision.source == "measured" and set(decision.times_us) == {"triton", "torch"}
    assert decision.shape == ab.shape_class("linear", torch.float32, 3, 5, 12, 10, 2, False, True)
    assert f"{decision.shape.key()} -> {decision.backend}" in caplog.text
    assert decision.shape.key() in ab.format_auto_decisions()[0]
    want = lora_ensemble_reference(x, w, b, a, bb, 0.5, False)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert x.grad is not None and a.grad is not None
    # Later calls of the shape: one dictionary lookup, no decision.
    monkeypatch.setattr(ab, "decide", lambda *args, **kwargs: pytest.fail("decided again"))
    for _ in range(3):
        functional.fused_lora_ensemble_linear(x, w, b, a, bb, 0.5, backend="auto")
    # Another row count in the same power-of-two bucket: the class's decision, no new one.
    x7 = torch.randn(3 * 7, 12, requires_grad=True)
    functional.fused_lora_ensemble_linear(x7, w, b, a, bb, 0.5, backend="auto")
    assert len(ab.auto_decisions()) == 1


def test_delta_op_and_no_grad_are_classes_of_their_own(two_candidates):
    x, w, b, a, bb = inputs(grad=False)
    base = torch.randn(x.shape[0], w.shape[0])
    out = functional.lora_ensemble_delta(x, base, a, bb, 0.5, backend="auto")
    with torch.no_grad():
        functional.fused_lora_ensemble_linear(x, w, b, a, bb, 0.5, backend="auto")
    keys = [d.shape.key() for d in ab.auto_decisions()]
    assert keys == ["delta float32 N3 M8 d12 k10 r2 stacked fwd", "linear float32 N3 M8 d12 k10 r2 stacked fwd"]
    want = base.double() + 0.5 * torch.einsum("nmr,nkr->nmk", torch.einsum("nmd,nrd->nmr",
                                                                           x.view(3, 5, 12).double(),
                                                                           a.double()), bb.double()).reshape(15, 10)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)


def test_compiled_auto_is_folded_to_a_modelled_constant(two_candidates):
    x, w, b, a, bb = inputs(grad=False)

    def layer(x):
        return functional.fused_lora_ensemble_linear(x, w, b, a, bb, 0.5, backend="auto")

    out = torch.compile(layer, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)
    compiled = [d for d in ab.auto_decisions() if "while torch.compile traces" in d.why()]
    assert len(compiled) == 1 and compiled[0].source == "model"


def test_info_lists_this_process_choices_the_tuning_file_and_the_model_per_gpu(fresh_auto, monkeypatch):
    from lora_ensemble import info

    monkeypatch.setattr(info, "gpu_spec", lambda device: H100_SXM)
    monkeypatch.setattr(info, "tuning_store", lambda device: tuning_store.tuning_store(CPU))
    ab.decide(CPU, shape(), ("a", "b"), lambda: {"a": slow, "b": fast})  # not recorded: decide alone
    ab._record(CPU, ab.decide(CPU, shape(rows=8), ("a", "b"), lambda: {"a": slow, "b": fast}))
    lines = info._per_shape_lines([torch.device("cuda", 0)])
    text = "\n".join(lines)
    assert shape(rows=8).key() in text and "measured here" in text
    assert "cuda:0 tuning file:" in text and "2 auto choices, 0 Triton winners" in text
    assert format_estimates(H100_SXM) in text
