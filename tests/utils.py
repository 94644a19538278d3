"""Shared test helpers: random inputs in the op's user layout, and named, dtype-aware comparisons
against the float64 reference (:mod:`lora_ensemble.reference`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from lora_ensemble import fused_lora_ensemble_linear
from lora_ensemble.reference import lora_ensemble_reference, lora_ensemble_reference_backward

# (atol, rtol) against the float64 reference, after scaling by the reference's magnitude.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}
TF32_TOLERANCE = (5e-4, 5e-4)


@dataclass
class OpInputs:
    """One call's inputs in the user layout (stacked ``[N*Bsz, ..., d]`` or shared ``[Bsz, ..., d]``)."""

    x: Tensor
    weight: Tensor
    bias: Tensor | None
    lora_A: Tensor
    lora_B: Tensor
    scaling: float
    shared_input: bool

    def tensors(self) -> dict[str, Tensor]:
        named = {"x": self.x, "weight": self.weight, "bias": self.bias, "lora_A": self.lora_A, "lora_B": self.lora_B}
        return {k: v for k, v in named.items() if v is not None}


def make_inputs(
    num_members: int,
    rows: int,
    d: int,
    k: int,
    rank: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    shared_input: bool = False,
    bias: bool = True,
    lead: tuple[int, ...] | None = None,
    noncontiguous: bool = False,
    scaling: float = 0.7,
    requires_grad: tuple[str, ...] = ("x", "lora_A", "lora_B"),
) -> OpInputs:
    """Random (never zero) inputs. ``rows`` is the number of rows per member; ``lead`` optionally
    splits them into extra dims (e.g. ``(2, 3)`` for ``Bsz=2`` sequences of 3 tokens). With
    ``noncontiguous`` every tensor is a strided view of a larger one."""
    lead = lead or (rows,)
    assert int(torch.tensor(lead).prod()) == rows
    x_lead = lead if shared_input else (num_members * lead[0], *lead[1:])

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        if noncontiguous:  # every other element of the last dim of a larger tensor
            base = torch.randn(*shape[:-1], 2 * shape[-1], device=device, dtype=torch.float32)
            return (base * scale).to(dtype)[..., ::2]
        return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)

    inp = OpInputs(
        x=rand(*x_lead, d),
        weight=rand(k, d, scale=d**-0.5),
        bias=rand(k) if bias else None,
        lora_A=rand(num_members, rank, d, scale=d**-0.5),
        lora_B=rand(num_members, k, rank, scale=rank**-0.5),
        scaling=scaling,
        shared_input=shared_input,
    )
    for name, t in inp.tensors().items():
        if name in requires_grad:
            t.requires_grad_(True)
    return inp


def assert_close_named(name: str, actual: Tensor, expected: Tensor, dtype: torch.dtype,
                       tol: tuple[float, float] | None = None) -> None:
    """``actual`` (any dtype) against the float64 ``expected``: |a - e| <= atol * scale + rtol * |e|,
    with ``scale`` the RMS of ``expected`` so tolerances hold for large reductions. The message names
    the tensor, the worst index, both values and the NaN count."""
    atol, rtol = tol or TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = e.pow(2).mean().sqrt().clamp_min(1e-30).item() if e.numel() else 1.0
    err = (a - e).abs()
    bound = atol * scale + rtol * e.abs()
    bad = ~(err <= bound)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())}/{e.numel()} elements off; worst at {idx}: got {a[idx].item():.6g}, "
            f"want {e[idx].item():.6g}; max err {err.max().item():.3g} (scale {scale:.3g}, atol {atol}, rtol {rtol}); "
            f"NaN in result: {int(torch.isnan(a).sum())}"
        )


def check_against_reference(inp: OpInputs, backend: str, tol: tuple[float, float] | None = None) -> None:
    """Forward and every requested gradient of ``backend`` against the float64 reference."""
    dtype = inp.x.dtype
    out = fused_lora_ensemble_linear(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling,
                                     shared_input=inp.shared_input, backend=backend)
    ref = lora_ensemble_reference(inp.x, inp.weight, inp.bias, inp.lora_A, inp.lora_B, inp.scaling,
                                  inp.shared_input)
    assert out.dtype == dtype, f"out dtype {out.dtype} != input dtype {dtype}"
    assert_close_named("out", out, ref, dtype, tol)
    wants = {n: t for n, t in inp.tensors().items() if t.requires_grad}
    if not wants:
        return
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(wants.values()), grad_out)
    ref_grads = lora_ensemble_reference_backward(grad_out, inp.x, inp.weight, inp.lora_A, inp.lora_B,
                                                 inp.scaling, inp.shared_input)
    for (name, t), g in zip(wants.items(), grads):
        assert g.dtype == t.dtype, f"grad of {name} has dtype {g.dtype}, want {t.dtype}"
        assert_close_named(f"d{name}", g, getattr(ref_grads, name), dtype, tol)


def only_stacked_configs(monkeypatch, configs: list) -> None:
    """Make the stacked fused kernel choose among ``configs`` alone, split-K or not (the pruning still
    applies), with launch and tuning tables of its own for the test."""
    from lora_ensemble.kernels import fused_lora_gemm

    monkeypatch.setattr(fused_lora_gemm, "fused_lora_gemm_configs", lambda split_k=False: list(configs))
    monkeypatch.setattr(fused_lora_gemm._STACKED, "bound", {})
    monkeypatch.setattr(fused_lora_gemm._STACKED, "tunings", {})


def split_k_into(monkeypatch, splits: int) -> None:
    """Make the stacked launches split K in ``splits`` ranges where the reduction is long enough (the
    policy with 64-element ranges allowed, on a GPU of ``splits`` SMs running one program a tile; the
    split tiling taken, not the one the cost model may prefer), with launch tables of their own."""
    from lora_ensemble.kernels import fused_lora_gemm, launch_policy

    monkeypatch.setattr(launch_policy, "MIN_INNER_PER_SPLIT", 64)
    monkeypatch.setattr(fused_lora_gemm, "with_k_splits", lambda tiling, rows, members, inner, cols, sm_count: (
        tiling._replace(k_splits=launch_policy.fused_k_splits(1, inner, launch_policy.FUSED_SPLIT_QUANTUM, splits))))
    take_the_split_tiling(monkeypatch)


def take_the_split_tiling(monkeypatch) -> None:
    """Make the stacked launches take the launch policy's split tiling where it splits K (the first on
    offer), not the one the cost model may prefer, with launch tables of their own."""
    from lora_ensemble.kernels import fused_lora_gemm

    monkeypatch.setattr(fused_lora_gemm, "cheapest_tiling", lambda options, launch_of, gpu: options[0])
    monkeypatch.setattr(fused_lora_gemm, "_SPLIT_K", {})
    for kernel in (fused_lora_gemm._STACKED, fused_lora_gemm._STACKED_SPLIT_K):
        monkeypatch.setattr(kernel, "bound", {})
        monkeypatch.setattr(kernel, "tunings", {})


def cpu_is_the_readmes(section: str) -> bool:
    """Whether this machine's CPU is of the vendor a README section names its table was made on ("an AMD
    EPYC CPU", "an Intel Xeon CPU"): the LoRA fine-tunes of the demos amplify the last-bit differences
    between CPU BLAS kernels (MKL takes other code paths on Intel and AMD, whatever its instruction-set
    settings), so their rows reproduce only there."""
    vendors = {"AMD": "AuthenticAMD", "Intel": "GenuineIntel"}
    named = [vendor for name, vendor in vendors.items() if re.search(rf"\ban\s+{name}\s", section)]
    assert len(named) == 1, "the README section must name the CPU its table was made on"
    try:
        with open("/proc/cpuinfo") as f:
            return named[0] in f.read()
    except OSError:
        return False
