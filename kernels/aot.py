# Ahead-of-time compilation of every Triton kernel of this package for NVIDIA targets on a machine
# without a GPU: triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch,
# 32)) runs the whole pipeline down to a cubin with ptxas. Each kernel is compiled for every dtype
# and dot precision (fp32 with TF32 and 3xTF32 dots, fp16, bf16), every rank tile (16, 32, 64, 128),
# the row tilings (row tile, rank slots, extra passes, member tiles: kernels/launch_policy.py) of six
# row regimes from decode to prefill, and every config the run-time pruning keeps for that problem on that
# architecture; and in two of the argument specialisations Triton makes at run time (unit strides
# are constexpr 1 in all of them, tuning-only arguments unspecialised): "aligned" (every pointer and
# every size and stride that follows the layer's widths 16-divisible, those that follow the rank or
# the rows, configs.RANK_OR_ROW_ARGS, not: contiguous inputs of aligned widths at any rank and row
# count), "odd" (no size or stride 16-divisible: odd widths; the review found spills here the aligned
# compile did not show). The row, member and rank counts are never specialised (the kernels'
# do_not_specialize: no constant 1 at decode, no extra compile), nor are the tuning-only arguments.
# The ptxas -v log of Triton's own compilation gives registers and spills (for a kernel that spills,
# its disassembly says where: spill_sites.py), the compiled kernel's metadata the shared memory, and
# a digest of its PTX without debug information tells whether a source edit changed a kernel
# (--compare-ptx): a spill record stays valid for every kernel it left unchanged.
"""Compile every kernel for GPU targets without a GPU; report registers, spills, shared memory.

Run as ``python -m lora_ensemble.kernels.aot [--arch 80 --arch 90]`` (``TRITON_INTERPRET`` must be
unset: the interpreter replaces the kernels by Python functions). ``--sample N`` compiles N cases per
kernel role instead of all (a quick check); ``--timeout S`` stops the run, its worker processes
included, after S seconds, and so does SIGTERM (exit status 3; ``--json`` keeps the reports so far).
Exit status 1 when a kernel fails to compile, needs more shared memory than the target has, or
spills registers (but for at most 32 bytes a thread outside loops: ``costly_spill``).
``--compare-ptx BEFORE.json AFTER.json`` compares the PTX digests of two runs' reports (e.g. the
same ``--sample`` before and after a kernel edit) and exits 1 if a kernel both compiled changed.
``--skip-measured REPORT.json ...`` leaves out the kernels those runs compiled: after the record is
written from them, the next round compiles only the cases it brings into the gate.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import io
import json
import multiprocessing
import os
import re
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, TimeoutError
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lora_ensemble.backends import triton_interpreting

from .configs import (
    FALLBACK_FUSED_LORA_GEMM_CONFIG,
    FUSED_LORA_GEMM_GPU_CONFIGS,
    FUSED_LORA_GEMM_SPLIT_K_GPU_CONFIGS,
    LORA_GRADS_GPU_CONFIGS,
    RANK_OR_ROW_ARGS,
    SHARED_INPUT_GPU_CONFIGS,
    SPECIALISED_SIZES,
    FusedProblem,
    column_group,
    fitting_lora_grads_configs,
    spill_key,
    spill_key_config,
    unspilled_tilings,
)
from .fused_lora_gemm import (
    _fused_lora_gemm_kernel,
    _fused_lora_gemm_shared_kernel,
    _fused_lora_gemm_split_k_kernel,
)
from .launch_policy import RowTiling, shared_tilings, stacked_tilings
from .lora_grads import _lora_grads_kernel
from .spill_sites import OUTSIDE_LOOPS, cubin_spill_sites
from .spilling_configs import SPILLING_CONFIGS

__all__ = ["ARCHS", "AotCase", "AotReport", "aot_cases", "candidate_configs", "compile_case", "main", "sample_cases"]

ARCHS = (80, 90)
# A spill the record does not exclude: at most this many bytes a thread, every local-memory instruction
# outside loops (spill_sites.py). 32 B x 256 threads (8 warps, the most a candidate has) = 8 KB a CTA,
# which the L1 left beside the largest shared-memory carve-out holds (A100: 192 - 164 KB, H100: 256 -
# 228 KB), so each word is stored and reloaded once a program from L1.
HARMLESS_SPILL_BYTES = 32
# The spill site of a device function the kernel calls (spill_sites places the kernel's own only).
CALLED_FUNCTION = "a called function"
# Largest dynamic shared memory per block (bytes) an NVIDIA architecture grants.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# (dtype, dot precision) pairs: fp32 runs one TF32 pass when PyTorch allows TF32, else 3xTF32.
VARIANTS = (("fp32", "tf32"), ("fp32", "tf32x3"), ("fp16", "tf32"), ("bf16", "tf32"))
RANK_TILES = (16, 32, 64, 128)
# Rows per member of the regimes whose row tilings are compiled, at 16 members: decode (one 16-row
# tile of 16 members), 16 rows a member (64-row tiles of 4), batch-1 ViT-B/32 (50: 64-row tiles of
# 2-3), batch-1 ViT-B/16 (197: 128-row tiles, some straddling two members: 2 slots a pass where the
# rank block has room, else a further pass), ViT-B/32 training (1600:
# 128-row tiles over each member's rows, 13 a member), prefill (4096: 128-row tiles in one member).
ROW_REGIMES = (1, 16, 50, 197, 1600, 4096)
MEMBERS = 16
# SMs of the GPU the shared-input row policy is asked about (an H100: batch-1 sizes get 16-row tiles).
_SM_COUNT = 132
SPECIALISATIONS = ("aligned", "odd")
# Width and depth of the problem the configs are pruned for: wide enough that no tile is cut.
_LARGE_SIZE = 4096
# The counts the kernels leave unspecialised (do_not_specialize).
_UNSPECIALISED_ARGS = {"ROWS", "MEMBERS", "RANK", "K_SPLITS"}
# Integer arguments always 16-divisible, whatever the widths (the split-K ranges: multiples of 64).
_ALIGNED_ARGS = {"K_PER_SPLIT"}
_FLOAT_ARGS = {"scaling", "member_sum_scale"}
_FP32_POINTERS = {"low_ptr", "low_a_ptr", "low_b_ptr", "partial_ptr"}
_INT32_POINTERS = {"arrivals_ptr"}

# (role, kernel, strides equal to 1 for contiguous inputs, fixed constexprs, config list). The *_delta
# roles are the low-rank update over a base layer the kernels cannot read (a quantized one): no weight,
# the base output added in the epilogue (forward) or nothing (dx).
_FORWARD_UNIT = {"stride_in_k", "stride_weight_k", "stride_shrink_k", "stride_expand_r", "stride_out_c", "stride_low_r"}
_DX_UNIT = {"stride_in_k", "stride_weight_c", "stride_shrink_r", "stride_expand_c", "stride_out_c", "stride_low_r"}
_GRADS_UNIT = {"stride_low_a_r", "stride_in_a_c", "stride_grad_a_c",
               "stride_low_b_r", "stride_in_b_c", "stride_grad_b_r"}
_GEMM = {"HAS_WEIGHT": True, "HAS_BASE": False}
_DELTA = {"HAS_WEIGHT": False, "HAS_BIAS": False}
_ROLES = (
    ("forward", _fused_lora_gemm_kernel, _FORWARD_UNIT, {**_GEMM, "HAS_BIAS": True}, FUSED_LORA_GEMM_GPU_CONFIGS),
    ("forward_shared", _fused_lora_gemm_shared_kernel, _FORWARD_UNIT,
     {**_GEMM, "HAS_BIAS": True, "SUM_MEMBERS": False}, SHARED_INPUT_GPU_CONFIGS),
    ("backward_dx", _fused_lora_gemm_kernel, _DX_UNIT, {**_GEMM, "HAS_BIAS": False}, FUSED_LORA_GEMM_GPU_CONFIGS),
    ("backward_dx_shared", _fused_lora_gemm_shared_kernel, _DX_UNIT,
     {**_GEMM, "HAS_BIAS": False, "SUM_MEMBERS": True}, SHARED_INPUT_GPU_CONFIGS),
    ("forward_delta", _fused_lora_gemm_kernel, _FORWARD_UNIT | {"stride_base_c"}, {**_DELTA, "HAS_BASE": True},
     FUSED_LORA_GEMM_GPU_CONFIGS),
    ("forward_shared_delta", _fused_lora_gemm_shared_kernel, _FORWARD_UNIT | {"stride_base_c"},
     {**_DELTA, "HAS_BASE": True, "SUM_MEMBERS": False}, SHARED_INPUT_GPU_CONFIGS),
    ("backward_dx_delta", _fused_lora_gemm_kernel, _DX_UNIT, {**_DELTA, "HAS_BASE": False},
     FUSED_LORA_GEMM_GPU_CONFIGS),
    ("backward_dx_shared_delta", _fused_lora_gemm_shared_kernel, _DX_UNIT,
     {**_DELTA, "HAS_BASE": False, "SUM_MEMBERS": True}, SHARED_INPUT_GPU_CONFIGS),
    ("forward_split_k", _fused_lora_gemm_split_k_kernel, _FORWARD_UNIT, {"HAS_BIAS": True},
     FUSED_LORA_GEMM_SPLIT_K_GPU_CONFIGS),
    ("backward_dx_split_k", _fused_lora_gemm_split_k_kernel, _DX_UNIT, {"HAS_BIAS": False},
     FUSED_LORA_GEMM_SPLIT_K_GPU_CONFIGS),
    ("backward_lora", _lora_grads_kernel, _GRADS_UNIT, {"ATOMIC": False}, LORA_GRADS_GPU_CONFIGS),
    ("backward_lora_split", _lora_grads_kernel, _GRADS_UNIT, {"ATOMIC": True}, LORA_GRADS_GPU_CONFIGS),
)
ROLE_NAMES = tuple(role[0] for role in _ROLES)
# The kernel each role runs, as named in SPILLING_CONFIGS (the weightless delta kernels spill at
# configs of their own: fewer tiles, but ptxas allocates them differently).
ROLE_KERNEL = {role: "lora_grads" if role.startswith("backward_lora") else "stacked_split" if role.endswith("_split_k")
               else ("shared" if "shared" in role else "stacked") + ("_delta" if role.endswith("_delta") else "")
               for role in ROLE_NAMES}
_SPILLING_CONFIGS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spilling_configs.py")


@dataclass(frozen=True)
class AotCase:
    """One compilation: a kernel role, its dtype and dot precision, rank tile, row tiling, launch
    config and argument specialisation (:data:`SPECIALISATIONS`)."""

    name: str
    dtype: str
    precision: str  # the dots' input_precision: "tf32" or, for fp32, "tf32x3"
    block_r: int
    block_m: int  # the fused kernels' row tile (launch policy); the lora_grads config sets its own
    config: triton.Config
    rank_slots: int = 1
    multi_pass: bool = False
    specialisation: str = "aligned"
    member_tiles: bool = False

    def label(self) -> str:
        """E.g. ``forward-bf16-R16-M128m-S1-aligned``: ``m`` after the row tile for member tiles,
        ``+`` after the rank slots for further passes."""
        dtype = f"{self.dtype}-{self.precision}" if self.dtype == "fp32" else self.dtype
        passes = "+" if self.multi_pass else ""
        tiles = "m" if self.member_tiles else ""
        return (f"{self.name}-{dtype}-R{self.block_r}-M{self.block_m}{tiles}-S{self.rank_slots}{passes}-"
                f"{self.specialisation}")

    def config_text(self) -> str:
        kwargs = " ".join(f"{k}={v}" for k, v in self.config.kwargs.items())
        return f"{kwargs} w{self.config.num_warps} s{self.config.num_stages}"

    def spill_key(self, arch: int) -> tuple:
        """This case's key in :data:`lora_ensemble.kernels.configs.SPILLING_CONFIGS` (the run-time
        pruning finds its launch's specialisation with ``configs.argument_specialisation``)."""
        return spill_key(ROLE_KERNEL[self.name], self.dtype, self.precision, self.block_r, self.block_m,
                         self.config, arch, self.rank_slots, self.multi_pass, self.specialisation, self.member_tiles)


@dataclass(frozen=True)
class AotReport:
    """What ptxas and the compiler report for one :class:`AotCase` on one architecture."""

    case: AotCase
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    shared_limit: int
    ptx_digest: str = ""
    # Where a spilling kernel's local-memory instructions sit (spill_sites.KernelSpills.places: loops
    # joined by " > ", OUTSIDE_LOOPS for those run once a program); empty when it does not spill.
    spill_sites: tuple[tuple[str, int], ...] = ()

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= self.shared_limit

    @property
    def spills(self) -> bool:
        """Whether the kernel spills in a way the spill record excludes (:func:`costly_spill`)."""
        return costly_spill({"spill_stores": self.spill_stores, "spill_loads": self.spill_loads,
                             "spill_sites": dict(self.spill_sites)})

    def as_dict(self) -> dict:
        return {"arch": self.arch, "case": self.case.label(), "config": self.case.config_text(),
                "spill_key": list(self.case.spill_key(self.arch)),
                "registers": self.registers, "spill_stores": self.spill_stores, "spill_loads": self.spill_loads,
                "shared_bytes": self.shared_bytes, "shared_limit": self.shared_limit, "fits": self.fits,
                "ptx_digest": self.ptx_digest, "spill_sites": dict(self.spill_sites)}

    def line(self) -> str:
        flag = "" if self.fits else "  EXCEEDS SHARED MEMORY"
        if self.spill_stores or self.spill_loads:
            flag += "  SPILLS" if self.spills else "  spills a little outside loops"
            flag += " (" + ", ".join(f"{count} {place if place == OUTSIDE_LOOPS else 'in ' + place}"
                                     for place, count in self.spill_sites) + ")"
        return (f"sm_{self.arch} {self.case.label():<56} {self.case.config_text():<44} regs {self.registers:>3}  "
                f"spills {self.spill_stores:>4}/{self.spill_loads:<4} smem {self.shared_bytes:>6}{flag}")


def costly_spill(report: dict) -> bool:
    """Whether a kernel's spill (a report's ``as_dict``) costs enough to exclude its config: any
    spill, but for one of at most :data:`HARMLESS_SPILL_BYTES` a thread whose local-memory
    instructions all sit outside loops (stored and reloaded once a program; a report without spill
    sites, written before they were measured, counts as costly)."""
    stores, loads = report["spill_stores"], report["spill_loads"]
    if not (stores or loads):
        return False
    sites = report.get("spill_sites") or {}
    return not (set(sites) == {OUTSIDE_LOOPS} and max(stores, loads) <= HARMLESS_SPILL_BYTES)


def _unwrap(kernel) -> triton.runtime.JITFunction:
    """The JIT function under the heuristics / autotune wrappers."""
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


def _role(name: str) -> tuple:
    return next(role for role in _ROLES if role[0] == name)


def candidate_configs(name: str, dtype: str, precision: str, block_r: int, rows: int, arch: int = 90,
                      specialisation: str = "aligned",
                      without_measured_spills: bool = True) -> list[tuple[RowTiling, triton.Config]]:
    """``(row tiling, config)`` for every config the run-time pruning keeps for role ``name`` on a
    problem of :data:`MEMBERS` members of ``rows`` rows (d = k = 4096) on ``sm_<arch>`` in
    ``specialisation``, in autotune order, at every row tiling the launcher may run
    (``configs.unspilled_tilings``: which one it runs depends on the widths; ``without_measured_spills
    =False``: the policy's own, with the configs the spill record excludes)."""
    _, kernel, _, fixed, configs = _role(name)
    if kernel is _lora_grads_kernel:
        kept = fitting_lora_grads_configs(list(configs), rows=rows, cols=_LARGE_SIZE, dtype=dtype, precision=precision,
                                          block_r=block_r, shared_memory=SHARED_MEMORY_LIMIT[arch], capability=arch,
                                          specialisation=specialisation,
                                          without_measured_spills=without_measured_spills)
        return [(RowTiling(c.kwargs["BLOCK_M"], 1, False), c) for c in kept]
    tf32x3 = precision == "tf32x3"
    if "SUM_MEMBERS" in fixed:
        tilings = shared_tilings(rows, _LARGE_SIZE, MEMBERS, block_r, _SM_COUNT, tf32x3, fixed["SUM_MEMBERS"])
    elif kernel is _fused_lora_gemm_split_k_kernel:  # any tiling splits K where the widths are small enough
        tilings = tuple(tiling._replace(k_splits=2) for tiling in stacked_tilings(rows, MEMBERS, block_r, tf32x3))
    else:
        tilings = stacked_tilings(rows, MEMBERS, block_r, tf32x3)
    problem = FusedProblem(_LARGE_SIZE, _LARGE_SIZE, dtype, precision, block_r, SHARED_MEMORY_LIMIT[arch], arch,
                           specialisation, fixed.get("SUM_MEMBERS"), fixed.get("HAS_WEIGHT", True))
    options = unspilled_tilings(list(configs), problem, tilings, without_measured_spills)
    return [(tiling, c) for tiling, kept in options for c in kept]


def aot_cases(arch: int = 90, without_measured_spills: bool = True) -> list[AotCase]:
    """Every kernel role x dtype/precision x rank tile x row tiling x specialisation x kept config
    on ``sm_<arch>``, without repeats (a tiling and config kept in several row regimes is one case)."""
    cases: dict[str, AotCase] = {}
    for name in ROLE_NAMES:
        for dtype, precision in VARIANTS:
            for block_r in RANK_TILES:
                for rows in ROW_REGIMES:
                    for specialisation in SPECIALISATIONS:
                        for tiling, config in candidate_configs(name, dtype, precision, block_r, rows, arch,
                                                                specialisation, without_measured_spills):
                            case = AotCase(name, dtype, precision, block_r, tiling.block_m, config, tiling.rank_slots,
                                           tiling.multi_pass, specialisation, tiling.member_tiles)
                            cases.setdefault(f"{case.label()} {case.config_text()}", case)
    return list(cases.values())


def sample_cases(cases: list[AotCase], per_role: int) -> list[AotCase]:
    """``per_role`` cases of each kernel role, spread evenly over its list (a quick check that every
    role still compiles; the full gate compiles them all)."""
    sampled = []
    for name in ROLE_NAMES:
        of_role = [c for c in cases if c.name == name]
        step = max(1, len(of_role) // per_role)
        sampled += of_role[::step][:per_role]
    return sampled


def _measured_runs(record_path: str) -> list[str]:
    """The runs a spill record's header lists, ``"triton 3.6.0 sm_90, stacked_split: 120 kernels, 46 of
    them spilling"`` each (those it was written from and those it carried over; runs recorded before
    2026-12-07 do not name their kernels)."""
    with open(record_path) as f:
        return [line[len("#   "):].rstrip() for line in f if line.startswith("#   triton ")]


def write_spilling_configs(report_paths: list[str], path: str = _SPILLING_CONFIGS_FILE,
                           keep_unmeasured: bool = False) -> int:
    """Write ``spilling_configs.py`` from the JSON reports of ``--all-candidates`` runs, or of gate
    runs (what the record keeps; with ``keep_unmeasured``), whole or stopped early, one or more per
    triton version and arch: every kernel whose spill is costly (:func:`costly_spill`). With
    ``keep_unmeasured`` the record's entries that no report measured stay in it (a partial
    re-measurement updates the record where it measured and keeps the rest, and its header the
    earlier runs). Returns how many entries there are."""
    runs: dict[tuple[str, int], tuple[set, set]] = {}  # (triton, arch): (keys compiled, keys that spilled)
    for report_path in report_paths:
        with open(report_path) as f:
            run = json.load(f)
        for report in run["reports"]:
            if isinstance(report, str):
                continue
            key = tuple(report["spill_key"])
            compiled, spilled = runs.setdefault((run["triton"], report["arch"]), (set(), set()))
            compiled.add(key)
            if costly_spill(report):
                spilled.add(key)
    measured = set().union(*(compiled for compiled, _ in runs.values()))
    spilling = set().union(*(spilled for _, spilled in runs.values()))
    # Each run named with the kernels it measured (a round of the record measures some kernels only).
    run_lines = [f"triton {version} sm_{arch}, {'+'.join(sorted({key[1] for key in compiled}))}: "
                 f"{len(compiled)} kernels, {len(spilled)} of them spilling"
                 for (version, arch), (compiled, spilled) in sorted(runs.items())]
    carried = {key for key in SPILLING_CONFIGS if key not in measured} if keep_unmeasured else set()
    earlier = [line for line in _measured_runs(_SPILLING_CONFIGS_FILE) if line not in run_lines] if carried else []
    # Only configs that can still run (a kernel's candidates, or the fused kernels' fallback): the
    # kernel and the config's part of a key, (kind, warps, stages, tiles).
    def kernel_config(key: tuple) -> tuple:
        return (key[1], *spill_key_config(key))

    fallback = (FALLBACK_FUSED_LORA_GEMM_CONFIG,)
    runnable = {kernel_config(spill_key(ROLE_KERNEL[name], "", "", 0, 0, config, 0))
                for name, _, _, _, configs in _ROLES
                for config in (*configs, *(() if name.startswith("backward_lora") else fallback))}
    spilling = {key for key in spilling if kernel_config(key) in runnable}
    carried = {key for key in carried if kernel_config(key) in runnable}
    lines = [
        "# Generated by `python -m lora_ensemble.kernels.aot --write-spilling-configs REPORT.json ...` from",
        "# `--all-candidates` and gate runs: every kernel that spilled registers (aot.costly_spill: all but",
        f"# spills of at most {HARMLESS_SPILL_BYTES} bytes a thread whose every local-memory instruction sits outside",
        "# loops). Keys of configs.spill_key: arch family, kernel, dtype, dot precision, rank tile, row tile,",
        "# rank slots, further passes, member tiles, specialisation, warps, stages, other tiles. The run-time",
        "# pruning never keeps these. Measured",
        "# (distinct kernels; a spill under one triton version excludes the config under every version):",
        *(f"#   {line}" for line in run_lines),
        *([f"# and {len(carried)} entries carried over from the previous record (not measured by these runs),"
           " whose runs were:"] if carried else []),
        *(f"#   {line}" for line in earlier),
        '"""Launch configs measured to spill registers (see kernels/aot.py)."""',
        "",
        "SPILLING_CONFIGS: frozenset[tuple] = frozenset({",
        *(f"    {key!r}," for key in sorted(spilling | carried)),
        "})",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return len(spilling | carried)


def _source(case: AotCase) -> ASTSource:
    _, kernel, unit_strides, fixed, _ = _role(case.name)
    fn = _unwrap(kernel)
    constexprs = {"BLOCK_R": case.block_r, "DOT_PRECISION": case.precision, "BLOCK_M": case.block_m, **fixed,
                  **case.config.kwargs}
    if kernel is not _lora_grads_kernel:
        constexprs.update(RANK_SLOTS=case.rank_slots, MULTI_PASS=case.multi_pass)
    if kernel is _fused_lora_gemm_kernel:
        constexprs.update(MEMBER_TILES=case.member_tiles, COL_TILES=column_group(case.config))
    if kernel is _fused_lora_gemm_split_k_kernel:
        constexprs.update(MEMBER_TILES=case.member_tiles)
    divisible = case.specialisation != "odd"
    signature, attrs = {}, {}
    for index, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in unit_strides:
            signature[arg] = "constexpr"
            constexprs[arg] = 1
        elif arg.endswith("_ptr"):
            atomic_out = fixed.get("ATOMIC") and arg in ("grad_a_ptr", "grad_b_ptr")
            signature[arg] = ("*i32" if arg in _INT32_POINTERS
                              else "*fp32" if (arg in _FP32_POINTERS or atomic_out) else f"*{case.dtype}")
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif arg in _ALIGNED_ARGS:
            signature[arg] = "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif arg in _FLOAT_ARGS:
            signature[arg] = "fp32"
        elif arg in _UNSPECIALISED_ARGS:
            signature[arg] = "i32"
        elif arg.startswith("stride_") or arg in SPECIALISED_SIZES:
            signature[arg] = "i32"
            if divisible and arg not in RANK_OR_ROW_ARGS:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            raise ValueError(f"{case.name}: no AOT signature rule for argument {arg!r} of {fn.__name__}")
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def ptx_digest(ptx: str) -> str:
    """16 hex digits of the SHA-256 of a kernel's PTX without what moves with its source lines: the
    debug directives (``.loc``, ``.file``), comments, the ``$L__tmp`` labels they use, and the debug
    sections at the end. Two compiles with the same digest run the same instructions."""
    kept = []
    for line in ptx.splitlines():
        text = line.strip()
        if text.startswith(".section"):
            break
        if text and not text.startswith((".loc", ".file", "//", "$L__tmp")):
            kept.append(text)
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()[:16]


def changed_kernels(before: dict, after: dict) -> tuple[list[str], int]:
    """The kernels two runs' JSON reports (``--json``) both compiled whose PTX digest differs (as
    ``"sm_<arch> <case> <config>"``), and how many they both compiled."""
    def digests(run: dict) -> dict[str, str]:
        return {f"sm_{r['arch']} {r['case']} {r['config']}": r.get("ptx_digest", "") for r in run["reports"]
                if not isinstance(r, str)}

    old, new = digests(before), digests(after)
    common = sorted(old.keys() & new.keys())
    return [name for name in common if old[name] != new[name]], len(common)


def _ptxas_usage(log: str) -> tuple[int, int, int, bool]:
    """(registers, spill store bytes, spill load bytes, whether a called function spills) from the
    ``ptxas -v`` log: the kernel's, plus those of the device functions it calls (not inlined, e.g. the
    split-K kernel's end), each reported on its own."""
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = [(int(stores), int(loads)) for stores, loads in
              re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    stores, loads = (sum(column) for column in zip(*spills)) if spills else (0, 0)
    return registers, stores, loads, any(store or load for store, load in spills[1:])


def compile_case(case: AotCase, arch: int = 90) -> AotReport:
    """Compile one case for ``sm_<arch>`` (no GPU needed) and report its resource usage, as the
    ``ptxas -v`` run of Triton's own compilation prints it."""
    knobs = triton.knobs
    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
        compiled = triton.compile(_source(case), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": case.config.num_warps, "num_stages": case.config.num_stages})
    registers, spill_stores, spill_loads, callee_spills = _ptxas_usage(log.getvalue())
    sites = ()
    if spill_stores or spill_loads:
        (kernel,) = cubin_spill_sites(compiled.asm["cubin"]).values()
        # A called function's local memory is not placed: it counts as a loop's.
        sites = (*kernel.places(), *((CALLED_FUNCTION, 1),) * callee_spills)
    return AotReport(case, arch, registers, spill_stores, spill_loads, compiled.metadata.shared,
                     SHARED_MEMORY_LIMIT[arch], ptx_digest(compiled.asm["ptx"]), sites)


def _compile_in_worker(args: tuple[AotCase, int]) -> AotReport | str:
    case, arch = args
    try:
        return compile_case(case, arch)
    except Exception as exc:  # reported per case, the run goes on
        return f"sm_{arch} {case.label()} ({case.config_text()}): {type(exc).__name__}: {exc}"


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux /proc; none found elsewhere), deepest first."""
    found = []
    for children in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError), open(children) as f:
            for child in map(int, f.read().split()):
                found += [*_descendants(child), child]
    return found


def _kill_workers() -> None:
    """Kill the compile workers (children of this process) and what they started (ptxas), so that
    none outlives a stopped run."""
    for child in multiprocessing.active_children():
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGSTOP)  # starts nothing more while its children are found
        for pid in _descendants(child.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        child.kill()
    for child in multiprocessing.active_children():
        child.join(timeout=5)


class _Stopped(Exception):
    """SIGTERM during a compile run: stop as on a timeout, keeping the reports so far."""


def _stop(signum: int, frame) -> None:
    raise _Stopped


def _compile_all(work: list[tuple[AotCase, int]], jobs: int, timeout: float | None) -> tuple[list, bool]:
    """Compile ``work`` on ``jobs`` worker processes; stop (killing the workers) after ``timeout``
    seconds or on SIGTERM. Returns the results so far, in order, and whether it stopped early."""
    results: list[AotReport | str] = []
    pool = ProcessPoolExecutor(max_workers=jobs)
    previous = signal.signal(signal.SIGTERM, _stop)
    finished = False
    try:
        for result in pool.map(_compile_in_worker, work, chunksize=4, timeout=timeout):
            results.append(result)
        finished = True
    except (TimeoutError, _Stopped):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not finished:
            _kill_workers()
        pool.shutdown(wait=finished, cancel_futures=True)
    return results, not finished


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_MEMORY_LIMIT),
                        help=f"compute capability, repeatable (default: {' and '.join(map(str, ARCHS))})")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", metavar="PATH", help="also write the reports (and failures) to PATH as JSON")
    parser.add_argument("--only", metavar="TEXT", default="",
                        help="compile only the cases whose label or config contains TEXT")
    parser.add_argument("--sample", type=int, metavar="N",
                        help="compile only N cases of each kernel role per arch (a quick check, not the gate)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="stop after SECONDS, worker processes included, with exit status 3")
    parser.add_argument("--all-candidates", action="store_true",
                        help="also compile the configs the spill record excludes (to measure it again)")
    parser.add_argument("--write-spilling-configs", nargs="+", metavar="REPORT",
                        help="write spilling_configs.py from the JSON of --all-candidates (or gate) runs, and exit")
    parser.add_argument("--keep-unmeasured", action="store_true",
                        help="with --write-spilling-configs: keep the record's entries the reports did not measure")
    parser.add_argument("--skip-measured", nargs="+", metavar="REPORT", default=[],
                        help="leave out the kernels these --json runs compiled (a record's next round: only the "
                             "cases the updated record brings in)")
    parser.add_argument("--compare-ptx", nargs=2, metavar=("BEFORE", "AFTER"),
                        help="compare the PTX digests of two --json runs; exit 1 if a kernel both compiled changed")
    args = parser.parse_args(argv)
    if args.compare_ptx:
        runs = []
        for path in args.compare_ptx:
            with open(path) as f:
                runs.append(json.load(f))
        changed, common = changed_kernels(*runs)
        print("\n".join(f"CHANGED {name}" for name in changed))
        print(f"{common - len(changed)}/{common} kernels compiled by both runs have the same PTX")
        return 1 if changed or not common else 0
    if args.write_spilling_configs:
        count = write_spilling_configs(args.write_spilling_configs, keep_unmeasured=args.keep_unmeasured)
        print(f"{_SPILLING_CONFIGS_FILE}: {count} spilling kernels")
        return 0
    if triton_interpreting():
        print("unset TRITON_INTERPRET: the interpreter cannot compile kernels", file=sys.stderr)
        return 2
    measured = set()
    for path in args.skip_measured:
        with open(path) as f:
            measured |= {(r["arch"], r["case"], r["config"]) for r in json.load(f)["reports"] if not isinstance(r, str)}
    work = []
    for arch in args.arch or ARCHS:
        cases = [c for c in aot_cases(arch, without_measured_spills=not args.all_candidates)
                 if args.only in f"{c.label()} {c.config_text()}"
                 and (arch, c.label(), c.config_text()) not in measured]
        work += [(case, arch) for case in (sample_cases(cases, args.sample) if args.sample else cases)]
    start = time.monotonic()
    results, timed_out = _compile_all(work, args.jobs, args.timeout)
    bad = 0
    for result in results:
        if isinstance(result, str):
            print(f"FAILED {result}")
            bad += 1
        else:
            print(result.line())
            bad += result.spills or not result.fits
    print(f"{len(results) - bad}/{len(work)} kernels compiled, fit and do not spill costly (triton "
          f"{triton.__version__}, {time.monotonic() - start:.0f} s on {args.jobs} jobs)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "cases": len(work), "timed_out": timed_out,
                       "reports": [r if isinstance(r, str) else r.as_dict() for r in results]}, f, indent=1)
    if timed_out:
        print(f"STOPPED (timeout {args.timeout} s or SIGTERM): {len(work) - len(results)} kernels not compiled",
              file=sys.stderr)
        return 3
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
