"""benchmarks/report.py on synthetic pytest-benchmark JSONs: the merge rules (runs of another dtype,
torch, device or commit are refused, a row is printed once), MISSING rows with their reasons, and
ratios from the device time."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from benchmarks import report

GROUP = "fwd | vit_infer N16 M50 d768 k768 r8"


def _bench(provider: str, median: float, device_s: float | None = None, group: str = GROUP) -> dict:
    mode = group.split(" | ")[0]
    info = {"provider": provider, "mode": mode, "shape": group.split(" | ")[1], "flops": 10**9, "bytes": 10**6,
            "floor_compute_s": 1e-6, "floor_memory_s": 1e-6}
    if device_s is not None:
        info.update(device_s=device_s, device_method="cuda_graph")
    return {"group": group, "name": f"test_op[{provider}]", "extra_info": info, "stats": {"median": median}}


def _run(benchmarks: list[dict], missing: list[dict] | None = None, commit: str = "abc", **machine: object) -> dict:
    info = {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda", "dtype": "bfloat16", "torch": "2.11.0",
            "triton": "3.6.0", "cuda": "13.0", "date": "2026-11-24 10:00 UTC",
            "providers": {"op": ["triton", "cuda", "vmap", "vmap_paper", "limit"], "e2e": ["triton", "limit"]}}
    info.update(machine)
    return {"machine_info": info, "commit_info": {"id": commit}, "benchmarks": benchmarks,
            "missing": missing or [], "datetime": "2026-11-24T10:00:00"}


@pytest.mark.parametrize(("field", "other"), [("dtype", "float32"), ("torch", "2.14.1"),
                                              ("device", "NVIDIA H200"), ("triton", "3.8.0")])
def test_merge_refuses_runs_that_differ(field: str, other: str) -> None:
    first = _run([_bench("vmap", 2e-5)])
    second = _run([_bench("limit", 1e-5)], **{field: other})
    with pytest.raises(ValueError, match=rf"different {field}.*a\.json: '{first['machine_info'][field]}'.*"
                                         rf"b\.json: '{other}'"):
        report.merge_runs([first, second], ["a.json", "b.json"])


def test_merge_refuses_runs_of_different_commits() -> None:
    with pytest.raises(ValueError, match="different commit"):
        report.merge_runs([_run([], commit="abc"), _run([], commit="def")])


def test_main_reports_a_refused_merge_as_a_usage_error(tmp_path: Path) -> None:
    paths = []
    for name, dtype in (("a.json", "bfloat16"), ("b.json", "float16")):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(_run([_bench("vmap", 1e-5)], dtype=dtype)))
    with pytest.raises(SystemExit):
        report.main([str(p) for p in paths] + ["--out-dir", str(tmp_path)])
    assert not (tmp_path / "a.md").exists()


def test_a_row_in_two_runs_is_printed_once_and_the_drop_is_noted() -> None:
    first = _run([_bench("vmap", 4e-5, 3e-5), _bench("triton", 1e-5, 0.5e-5)])
    second = _run([_bench("triton", 2e-5, 0.7e-5), _bench("limit", 1e-5, 0.4e-5)])
    data = report.merge_runs([first, second], ["a.json", "b.json"])
    assert [b["extra_info"]["provider"] for b in data["benchmarks"]] == ["vmap", "triton", "limit"]
    assert data["duplicates"] == [{"group": GROUP, "provider": "triton", "kept_from": "a.json",
                                   "dropped_from": "b.json", "kept_median": 1e-5, "kept_device_s": 0.5e-5,
                                   "dropped_median": 2e-5, "dropped_device_s": 0.7e-5}]
    markdown = report.render_markdown(data, "merged")
    assert markdown.count("| triton |") == 1
    assert "also in `b.json`" in markdown and "the row shown is `a.json`'s" in markdown
    # The ratios use the kept row's device time: vmap 30 µs / triton 5 µs.
    triton = next(b for b in data["benchmarks"] if b["extra_info"]["provider"] == "triton")
    assert triton["extra_info"]["time_vs_vmap"] == pytest.approx(1 / 6)
    assert triton["extra_info"]["host_vs_vmap"] == pytest.approx(1 / 4)


def test_skipped_failed_and_absent_providers_are_missing_with_their_reasons() -> None:
    missing = [{"group": GROUP, "provider": "cuda", "outcome": "skipped", "reason": "lora_ensemble._C not built"},
               {"group": GROUP, "provider": "triton", "outcome": "failed", "reason": "RuntimeError: launch failed"}]
    data = report.merge_runs([_run([_bench("vmap", 2e-5, 2e-5), _bench("limit", 1e-5, 1e-5)], missing)])
    markdown = report.render_markdown(data, "one run")
    assert "| triton | **MISSING** (failed: RuntimeError: launch failed) |" in markdown
    assert "| cuda | **MISSING** (skipped: lora_ensemble._C not built) |" in markdown
    # vmap_paper is one of the run's op providers but has no row and no recorded reason.
    assert "| vmap_paper | **MISSING** (absent: no row in the JSON) |" in markdown
    # Providers in order: MISSING rows sit where the provider would be.
    providers = [line.split(" | ")[1] for line in markdown.splitlines() if line.startswith("| ") and " | " in line
                 and line.split(" | ")[1] in report.PROVIDER_ORDER]
    assert providers == ["triton", "cuda", "vmap", "vmap_paper", "limit"]


def test_a_row_found_in_another_run_is_not_missing_and_a_failure_after_timing_is_noted() -> None:
    skipped_in_a = {"group": GROUP, "provider": "triton", "outcome": "skipped", "reason": "not selected"}
    failed_in_b = {"group": GROUP, "provider": "limit", "outcome": "failed", "reason": "MemoryError"}
    data = report.merge_runs([_run([_bench("limit", 1e-5)], [skipped_in_a]),
                              _run([_bench("triton", 1e-5)], [failed_in_b])])
    assert data["missing"] == []
    assert data["failed_after_timing"] == [failed_in_b]
    markdown = report.render_markdown(data, "parts")
    assert "MISSING** (skipped" not in markdown
    assert "then its test failed: MemoryError" in markdown


def test_graph_capture_failures_are_noted_and_rows_say_how_they_were_timed() -> None:
    events_row = _bench("vmap", 3e-5, 2e-5)
    events_row["extra_info"].update(device_method="cuda_events", graph_error="capture failed: RuntimeError: x")
    data = report.merge_runs([_run([events_row, _bench("limit", 1e-5, 0.8e-5)])])
    markdown = report.render_markdown(data, "graphs")
    assert "| vmap | 30.0 µs | 20.0 µs | events |" in markdown
    assert "| limit | 10.0 µs | 8.0 µs | graph |" in markdown
    assert "device time from events, capture failed: RuntimeError: x" in markdown


def test_a_json_without_device_times_or_provider_lists_still_renders() -> None:
    old = _run([_bench("vmap", 2e-5), _bench("limit", 1e-5)])
    del old["machine_info"]["providers"], old["missing"]
    markdown = report.render_markdown(copy.deepcopy(old), "old")
    assert "| vmap | 20.0 µs | — | — |" in markdown  # no device time measured; ratios use host medians
    assert "MISSING" not in markdown  # expected providers: the ones seen in the op modes


def test_plot_has_a_panel_per_mode_with_vmap_and_survives_none(tmp_path: Path) -> None:
    data = report.merge_runs([_run([_bench("vmap", 2e-5, 2e-5), _bench("limit", 1e-5, 1e-5)])])
    report.render_plot(data, tmp_path / "one.png")
    report.render_plot(report.merge_runs([_run([_bench("limit", 1e-5, 1e-5)])]), tmp_path / "none.png")
    assert (tmp_path / "one.png").stat().st_size > 0 and (tmp_path / "none.png").stat().st_size > 0
