"""Every Triton kernel compiles for Ampere (sm_80) and Hopper (sm_90) ahead of time, without a GPU,
in every config the run-time pruning keeps, fits the shared memory and spills no register (but for at
most 32 bytes a thread outside loops: ``aot.costly_spill``).

``python -m lora_ensemble.kernels.aot`` runs triton.compile for GPUTarget("cuda", arch, 32) down to a
cubin (ptxas included) for every kernel role, dtype and dot precision, rank tile, row tiling and
argument specialisation, with every config the pruning keeps there (about 1500 kernels per arch);
it runs in a subprocess because the interpreter (TRITON_INTERPRET=1, set for the other tests)
replaces the kernels by Python functions.

By default this file compiles a sample (``--sample``: a few cases of every kernel role on both
archs, about a minute on 2 cores with an empty Triton cache). The full gate, for CI as a step of
its own: ``LORA_ENSEMBLE_AOT_GATE=full python -m pytest tests/test_triton_aot.py``. Either way the
compile runs in a session of its own and is killed as a process group when it runs out of time,
so no worker outlives it.
"""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import triton

from lora_ensemble.kernels import aot

FULL = os.environ.get("LORA_ENSEMBLE_AOT_GATE", "sample") == "full"
SAMPLE_PER_ROLE = 2
# The full gate: ~4300 cases at ~1 s of CPU each (triton 3.8, 2026-12); the sample: ~40.
TIMEOUT_S = 2 * 3600 if FULL else 600


@pytest.fixture(scope="module")
def aot_reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "reports.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "lora_ensemble.kernels.aot", "--json", str(out), "--timeout", str(TIMEOUT_S - 60)]
    if not FULL:
        command += ["--sample", str(SAMPLE_PER_ROLE)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the compile and every worker it started
        stdout, stderr = proc.communicate()
        pytest.fail(f"the AOT compile ran past {TIMEOUT_S} s:\n{stdout[-4000:]}\n{stderr[-4000:]}")
    assert out.exists(), f"the AOT compile did not run:\n{stdout[-4000:]}\n{stderr[-4000:]}"
    run = json.loads(out.read_text())
    assert run["triton"] == triton.__version__
    assert not run["timed_out"], stderr[-4000:]
    return run, proc.returncode, stdout + stderr


def test_every_kernel_compiles_for_every_arch(aot_reports):
    run, _, _ = aot_reports
    reports = run["reports"]
    failures = [r for r in reports if isinstance(r, str)]
    assert not failures, "\n".join(failures)
    seen = {(r["arch"], r["case"].split("-")[0]) for r in reports}
    assert seen == {(arch, role) for arch in aot.ARCHS for role in aot.ROLE_NAMES}
    expected = [aot.aot_cases(arch) for arch in aot.ARCHS]
    if not FULL:
        expected = [aot.sample_cases(cases, SAMPLE_PER_ROLE) for cases in expected]
    assert len(reports) == run["cases"] == sum(map(len, expected))
    assert all(re.fullmatch(r"[0-9a-f]{16}", r["ptx_digest"]) for r in reports), "a report without its PTX digest"
    if FULL:
        cases = {r["case"] for r in reports}
        for rank_tile in aot.RANK_TILES:
            for dtype in ("fp32-tf32-", "fp32-tf32x3-", "fp16-", "bf16-"):
                assert any(f"-{dtype}R{rank_tile}-" in c for c in cases), (dtype, rank_tile)
        for block_m in (16, 32, 64, 128):
            assert any(f"-M{block_m}-" in c for c in cases), block_m
        for specialisation in aot.SPECIALISATIONS:
            assert any(c.endswith(f"-{specialisation}") for c in cases), specialisation
        assert any("+-" in c for c in cases), "a kernel with further rank passes"
        assert any("m-S1-" in c for c in cases), "a kernel with member tiles"
        assert any("COL_TILES=2" in r["config"] for r in reports), "a kernel with column groups"


def test_every_kept_config_fits_without_spills(aot_reports):
    run, returncode, output = aot_reports
    compiled = [r for r in run["reports"] if not isinstance(r, str)]
    too_big = [f"sm_{r['arch']} {r['case']} ({r['config']}): {r['shared_bytes']} > {r['shared_limit']} bytes"
               for r in compiled if not r["fits"]]
    assert not too_big, "shared memory exceeded:\n" + "\n".join(too_big)
    spilling = [f"sm_{r['arch']} {r['case']} ({r['config']}): {r['spill_stores']}/{r['spill_loads']} bytes spilled, "
                f"{r['registers']} registers, local-memory instructions {r['spill_sites']}"
                for r in compiled if aot.costly_spill(r)]
    assert not spilling, f"{len(spilling)} kernels spill registers costly:\n" + "\n".join(spilling)
    assert returncode == 0, output[-4000:]


def test_no_16bit_case_of_the_gate_runs_a_kernel_measured_to_spill():
    """Where every config of the launch policy's row tiling spills, the launcher may take a smaller
    row tile (``configs.unspilled_tilings``): no fp16 or bf16 case of the gate, on either arch, is left
    with a kernel the spill record lists (the pruning never keeps one, so only a fallback could be).
    Some fp32 ones at rank tiles 32-128 still are (benchmarks/NOTES.md, "Smaller row tiles")."""
    for arch in aot.ARCHS:
        spilling = [case.label() for case in aot.aot_cases(arch)
                    if case.dtype != "fp32" and case.spill_key(arch) in aot.SPILLING_CONFIGS]
        assert not spilling, (arch, spilling)


def test_a_stopped_compile_leaves_no_worker(tmp_path):
    """``--timeout`` stops the run with exit status 3 and kills its compile workers (the earlier
    gate's pool workers went on compiling as orphans after its subprocess timeout)."""
    out = tmp_path / "reports.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "-m", "lora_ensemble.kernels.aot", "--json", str(out), "--jobs", "2",
                             "--timeout", "1", "--only", "forward-bf16"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("--timeout 1 did not stop the compile within 300 s")
    assert proc.returncode == 3, stdout[-2000:] + stderr[-2000:]
    assert json.loads(out.read_text())["timed_out"]
    # What is left of its group may only be killed processes not yet reaped (zombies: a killed worker's
    # ptxas is reparented to init, which reaps it when it gets to it).
    states = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-g", str(proc.pid)], capture_output=True,
                            text=True).stdout.splitlines()
    running = [line for line in states if line.split()[1:2] and not line.split()[1].startswith("Z")]
    assert not running, "processes of the stopped compile still running:\n" + "\n".join(running)


def test_a_next_round_compiles_only_the_cases_earlier_runs_did_not(tmp_path):
    """``--skip-measured``: the kernels earlier ``--json`` runs compiled are left out (after the record
    is written from them, the gate's new cases are all that is left to compile)."""
    only = "forward_split_k-bf16-R16-M16-S8+-aligned"
    cases = [(arch, c) for arch in aot.ARCHS for c in aot.aot_cases(arch) if only in f"{c.label()} {c.config_text()}"]
    assert len(cases) >= 2
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"triton": triton.__version__, "cases": len(cases) - 1, "timed_out": False,
                                   "reports": [{"arch": arch, "case": c.label(), "config": c.config_text()}
                                               for arch, c in cases[1:]]}))
    out = tmp_path / "next.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "lora_ensemble.kernels.aot", "--json", str(out), "--only", only,
                           "--skip-measured", str(earlier)], env=env, capture_output=True, text=True, timeout=600)
    (report,) = json.loads(out.read_text())["reports"]
    arch, case = cases[0]
    assert (report["arch"], report["case"], report["config"]) == (arch, case.label(), case.config_text()), done.stdout


def _report(arch: int, key: tuple, spills: int) -> dict:
    return {"arch": arch, "spill_key": list(key), "spill_stores": spills, "spill_loads": spills}


def test_a_partial_remeasurement_updates_the_spill_record_where_it_measured(tmp_path):
    """--write-spilling-configs with --keep-unmeasured: measured keys follow the reports (a spill is
    added, a clean compile removes an old entry), keys no report measured stay as they were, and
    configs that are no candidate any more are left out."""
    old_clean, old_unmeasured = sorted(aot.SPILLING_CONFIGS)[:2]
    new_spill = (90, "stacked", "bf16", "tf32", 16, 16, 8, True, False, "aligned", 4, 4, 64, 64)  # a listed config
    gone = (90, "stacked", "bf16", "tf32", 16, 16, 8, True, False, "aligned", 4, 3, 64, 64)  # no such candidate
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"triton": triton.__version__, "cases": 3, "timed_out": True, "reports": [
        _report(old_clean[0], old_clean, 0), _report(90, new_spill, 16), _report(90, gone, 8), "FAILED some kernel"]}))
    record = tmp_path / "spilling_configs.py"
    for keep in (False, True):
        count = aot.write_spilling_configs([str(report)], str(record), keep_unmeasured=keep)
        scope = {}
        exec(record.read_text(), scope)
        written = scope["SPILLING_CONFIGS"]
        assert new_spill in written and old_clean not in written and gone not in written and count == len(written)
        assert (old_unmeasured in written) == keep
        assert f"triton {triton.__version__} sm_90, stacked: 2 kernels, 2 of them spilling" in record.read_text()
        assert (f"triton {triton.__version__} sm_{old_clean[0]}, {old_clean[1]}: 1 kernels, 0 of them spilling"
                in record.read_text())
        # The runs that measured the carried entries stay named in the header, and only then.
        earlier = aot._measured_runs(aot._SPILLING_CONFIGS_FILE)
        assert earlier and all((f"#   {line}" in record.read_text()) == keep for line in earlier)


def test_a_small_spill_outside_loops_is_not_recorded(tmp_path):
    """``aot.costly_spill``: a spill of at most 32 bytes a thread whose local-memory instructions all
    sit outside loops leaves its config runnable; a site inside a loop, more bytes, a report without
    sites (measured before they were) or a costly report of another kernel with the same key (the
    dx of a forward, another triton version) puts it in the record."""
    def key(block_r: int, block_m: int) -> tuple:  # a candidate config of the stacked kernel
        return (90, "stacked", "bf16", "tf32", block_r, block_m, 1, False, False, "aligned", 4, 4, 64, 64)

    def spilled(k: tuple, nbytes: int, sites: dict | None) -> dict:
        report = {**_report(90, k, nbytes), "spill_sites": sites}
        return report if sites is not None else {name: v for name, v in report.items() if name != "spill_sites"}

    outside = {"outside loops": 5}
    small, in_loop, too_big, legacy, twin = key(16, 16), key(32, 16), key(64, 16), key(128, 16), key(16, 32)
    reports = [spilled(small, 32, outside), spilled(in_loop, 8, {"outside loops": 1, "k.py:120": 1}),
               spilled(too_big, 36, outside), spilled(legacy, 8, None),
               spilled(twin, 8, outside), spilled(twin, 16, {"k.py:120": 2}), _report(90, key(32, 32), 0)]
    assert [aot.costly_spill(r) for r in reports] == [False, True, True, True, False, True, False]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"triton": triton.__version__, "cases": 7, "timed_out": False, "reports": reports}))
    record = tmp_path / "spilling_configs.py"
    aot.write_spilling_configs([str(path)], str(record))
    scope = {}
    exec(record.read_text(), scope)
    assert scope["SPILLING_CONFIGS"] == {in_loop, too_big, legacy, twin}


def test_the_spills_of_a_called_function_count_and_are_costly():
    """A kernel calling a device function (not inlined: the split-K kernel's end): ``ptxas -v`` reports
    each function's spills on its own line; both count, and a spilling callee (whose local memory the
    disassembly of the kernel does not place) makes the spill costly whatever its size."""
    log = """ptxas info    : Compiling entry function 'k' for 'sm_90'
ptxas info    : Function properties for k
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16 bytes cumulative stack size, 536 bytes cmem[0]
ptxas info    : Function properties for callee
    0 bytes stack frame, %d bytes spill stores, %d bytes spill loads
"""
    assert aot._ptxas_usage(log % (0, 0)) == (255, 8, 12, False)
    assert aot._ptxas_usage(log % (4, 4)) == (255, 12, 16, True)
    report = {"spill_stores": 12, "spill_loads": 16, "spill_sites": {"outside loops": 3}}
    assert not aot.costly_spill(report)
    assert aot.costly_spill({**report, "spill_sites": {"outside loops": 3, aot.CALLED_FUNCTION: 1}})


def test_the_ptx_digest_ignores_debug_information_and_nothing_else():
    ptx = """//
// Generated by LLVM NVPTX Back-End
.version 8.7
.target sm_90a
	.file	1 "/src/kernels/fused_lora_gemm.py"
.visible .entry k(
)
{
	.loc	1 310 0
$L__tmp3:
	mov.u32 	%r1, %tid.x;
	ret;
}
	.section	.debug_abbrev
{
}
"""
    moved = ptx.replace("310 0", "352 0").replace("$L__tmp3", "$L__tmp7").replace("/src/", "/elsewhere/")
    assert aot.ptx_digest(moved) == aot.ptx_digest(ptx)
    assert aot.ptx_digest(ptx.replace("%tid.x", "%tid.y")) != aot.ptx_digest(ptx)


def test_compare_ptx_names_the_kernels_that_changed(tmp_path, capsys):
    def run(digests: dict[str, str]) -> dict:
        return {"triton": triton.__version__, "cases": len(digests), "timed_out": False, "reports": [
            {"arch": 90, "case": case, "config": "BLOCK_N=64 w4 s4", "ptx_digest": digest}
            for case, digest in digests.items()] + ["FAILED a kernel"]}

    before, after, same = tmp_path / "before.json", tmp_path / "after.json", tmp_path / "same.json"
    before.write_text(json.dumps(run({"a": "0" * 16, "b": "1" * 16, "c": "2" * 16})))
    after.write_text(json.dumps(run({"a": "0" * 16, "b": "f" * 16, "d": "3" * 16})))
    same.write_text(json.dumps(run({"a": "0" * 16, "c": "2" * 16})))
    assert aot.changed_kernels(json.loads(before.read_text()), json.loads(after.read_text())) == (
        ["sm_90 b BLOCK_N=64 w4 s4"], 2)
    assert aot.main(["--compare-ptx", str(before), str(after)]) == 1
    assert "CHANGED sm_90 b BLOCK_N=64 w4 s4" in capsys.readouterr().out
    assert aot.main(["--compare-ptx", str(before), str(same)]) == 0
    assert "2/2 kernels compiled by both runs have the same PTX" in capsys.readouterr().out


def test_a_kernel_compiled_again_has_the_same_ptx_digest(aot_reports, tmp_path):
    """Compiled again in a new process (the digest of a kernel is stable: what --compare-ptx relies on)."""
    run, _, _ = aot_reports
    report = next(r for r in run["reports"] if not isinstance(r, str) and r["arch"] == 90)
    out = tmp_path / "again.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "lora_ensemble.kernels.aot", "--arch", "90", "--json", str(out), "--only",
                    f"{report['case']} {report['config']}"], env=env, capture_output=True, timeout=300)
    (again,) = json.loads(out.read_text())["reports"]
    assert again["ptx_digest"] == report["ptx_digest"]
