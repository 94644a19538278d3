"""Every Triton kernel compiles for Ampere (sm_80) and Hopper (sm_90) ahead of time, without a GPU,
in every config the run-time pruning keeps, fits the shared memory and spills no register.

``python -m lora_ensemble.kernels.aot`` runs triton.compile for GPUTarget("cuda", arch, 32) down to a
cubin (ptxas included) for every kernel role, dtype and dot precision, rank tile and row-tile regime,
with every config the pruning keeps there (about 1350 kernels per arch); it runs in a subprocess because
the interpreter (TRITON_INTERPRET=1, set for the other tests) replaces the kernels by Python functions.
"""

import json
import os
import subprocess
import sys

import pytest
import triton

from lora_ensemble.kernels import aot


@pytest.fixture(scope="module")
def aot_reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "reports.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "lora_ensemble.kernels.aot", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=3000)
    assert out.exists(), f"the AOT compile did not run:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    run = json.loads(out.read_text())
    assert run["triton"] == triton.__version__
    return run["reports"], proc


def test_every_kernel_compiles_for_every_arch(aot_reports):
    reports, proc = aot_reports
    failures = [r for r in reports if isinstance(r, str)]
    assert not failures, "\n".join(failures)
    seen = {(r["arch"], r["case"].split("-")[0]) for r in reports}
    assert seen == {(arch, role) for arch in aot.ARCHS for role in aot.ROLE_NAMES}
    cases = {r["case"] for r in reports}
    for rank_tile in aot.RANK_TILES:
        for dtype in ("fp32-tf32-", "fp32-tf32x3-", "fp16-", "bf16-"):
            assert any(f"-{dtype}R{rank_tile}-" in c for c in cases), (dtype, rank_tile)
    assert any(c.endswith("-M16") for c in cases) and any(c.endswith("-M128") for c in cases)
    assert len(reports) == sum(len(aot.aot_cases(arch)) for arch in aot.ARCHS)


def test_every_kept_config_fits_without_spills(aot_reports):
    reports, proc = aot_reports
    compiled = [r for r in reports if not isinstance(r, str)]
    too_big = [f"sm_{r['arch']} {r['case']} ({r['config']}): {r['shared_bytes']} > {r['shared_limit']} bytes"
               for r in compiled if not r["fits"]]
    assert not too_big, "shared memory exceeded:\n" + "\n".join(too_big)
    spilling = [f"sm_{r['arch']} {r['case']} ({r['config']}): {r['spill_stores']}/{r['spill_loads']} bytes spilled, "
                f"{r['registers']} registers" for r in compiled if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, f"{len(spilling)} kernels spill registers:\n" + "\n".join(spilling)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
