"""Every Triton kernel compiles for Hopper (sm_90) ahead of time, without a GPU.

``python -m lora_ensemble.kernels.aot`` runs triton.compile for a GPUTarget("cuda", 90, 32) down to
a cubin (ptxas included) for every kernel role, dtype and a small and the largest rank tile, with
the first autotune config the run-time pruning keeps; it runs in a subprocess because the
interpreter (TRITON_INTERPRET=1, set for the other tests) replaces the kernels by Python functions.
"""

import json
import os
import subprocess
import sys

import pytest

ARCHS = [90]


@pytest.fixture(scope="module", params=ARCHS, ids=[f"sm_{a}" for a in ARCHS])
def aot_reports(request, tmp_path_factory):
    arch = request.param
    out = tmp_path_factory.mktemp("aot") / f"sm_{arch}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "lora_ensemble.kernels.aot", "--arch", str(arch), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    print(proc.stdout)  # the register / spill / shared-memory table, shown with pytest -s or on failure
    assert out.exists(), f"the AOT compile did not run:\n{proc.stdout}\n{proc.stderr}"
    return arch, json.loads(out.read_text()), proc


def test_every_kernel_compiles(aot_reports):
    arch, reports, proc = aot_reports
    failures = [r for r in reports if isinstance(r, str)]
    assert not failures, "\n".join(failures)
    roles = {r["case"].split("-")[0] for r in reports}
    assert roles == {"forward", "forward_shared", "backward_dx", "backward_dx_shared", "backward_lora",
                     "backward_lora_split"}
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_default_configs_fit_without_spills(aot_reports):
    arch, reports, _ = aot_reports
    compiled = [r for r in reports if not isinstance(r, str)]
    too_big = [f"{r['case']}: {r['shared_bytes']} > {r['shared_limit']} bytes" for r in compiled if not r["fits"]]
    assert not too_big, f"sm_{arch} shared memory exceeded:\n" + "\n".join(too_big)
    spilling = [f"{r['case']} ({r['config']}): {r['spill_stores']} bytes spilled, {r['registers']} registers"
                for r in compiled if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, f"sm_{arch} register spills:\n" + "\n".join(spilling)
