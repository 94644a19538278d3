"""Turn ``pytest benchmarks/ --benchmark-json=FILE.json`` output into ``FILE.md`` and ``FILE.png``.

    python -m benchmarks.report benchmarks/results/cpu.json [--out-dir DIR]
    python -m benchmarks.report part1.json part2.json --name h100   # a suite run in parts

The markdown holds the machine line (device, dtype, torch, triton, CUDA, date), the measured peaks
(and the spec sheet's, as a reference), the floors of every op shape, and one table per mode with,
for every provider of a shape: the host and device time per call (see :mod:`benchmarks.measure`),
achieved TFLOP/s and GB/s (the op's unavoidable FLOPs and bytes over the device time, see
:mod:`benchmarks.cost_model`), the device-time ratio to ``limit`` and the speedups over ``vmap`` and
``vmap_paper``, the host-time speedup over ``vmap``, and the training step's memory. A provider the
run expected but that has no row (skipped or failed) is printed as MISSING, with the reason the
JSON recorded. The plot shows the device-time speedup over ``vmap`` per provider and shape.

Several JSONs merge into one report only when they come from the same device, dtype, torch,
triton, CUDA and commit (:func:`merge_runs` raises otherwise); a row present in more than one is
printed once (the first file's), and the report says which rows were dropped and their times.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

__all__ = ["MERGE_FIELDS", "PROVIDER_ORDER", "add_ratios", "main", "merge_runs", "render_markdown", "render_plot"]

PROVIDER_ORDER: tuple[str, ...] = (
    "triton", "cuda", "graphed", "bmm", "grouped_mm", "compiled", "vmap", "vmap_paper", "vmap_shared_w0", "sequential",
    "explicit", "limit")
OP_MODES: tuple[str, ...] = ("fwd", "bwd", "fwd_bwd")
E2E_MODES: tuple[str, ...] = ("e2e_infer", "e2e_train")
MODE_TITLES: dict[str, str] = {
    "fwd": "Forward (inference, no autograd graph)",
    "bwd": "Backward (replayed backward of one forward)",
    "fwd_bwd": "Forward + backward (training step of the layer)",
    "e2e_infer": "End to end: ensemble inference",
    "e2e_train": "End to end: training step (forward, cross-entropy, backward)",
    "overhead fwd": "Host cost per call (bench_overhead, a tiny layer): training forward",
    "overhead fwd_bwd": "Host cost per call (bench_overhead, a tiny layer): forward + backward",
}
# machine_info fields that must agree for runs to share a report (the commit is checked as well).
MERGE_FIELDS: tuple[str, ...] = ("device", "device_type", "dtype", "torch", "triton", "cuda")
_RATIO_REFS: tuple[str, ...] = ("limit", "vmap", "vmap_paper")
_METHOD_LABELS = {"cuda_graph": "graph", "cuda_events": "events", "wall_clock": "wall"}


def _median(bench: dict) -> float | None:
    stats = bench.get("stats")
    return stats["median"] if stats else None


def _device_s(bench: dict) -> float | None:
    """The row's device time; its host median where none was measured (rows of bench_overhead, JSONs
    written before device times existed), so that ratios compare like with like within a group."""
    return bench["extra_info"].get("device_s") or _median(bench)


def add_ratios(benchmarks: list[dict]) -> None:
    """Set ``extra_info["time_vs_<ref>"]`` of every row for ``ref`` in ``limit``, ``vmap`` and
    ``vmap_paper``: its device time over the ref's in the same group, and ``host_vs_vmap``: the same
    for the host medians (None where either is missing)."""
    device: dict[str, dict[str, float]] = defaultdict(dict)
    host: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in benchmarks:
        provider = bench["extra_info"]["provider"]
        if _device_s(bench) is not None:
            device[bench["group"]][provider] = _device_s(bench)
            host[bench["group"]][provider] = _median(bench)
    for bench in benchmarks:
        info, group = bench["extra_info"], bench["group"]
        own, own_host = _device_s(bench), _median(bench)
        for ref in _RATIO_REFS:
            ref_s = device[group].get(ref)
            info[f"time_vs_{ref}"] = own / ref_s if own is not None and ref_s else None
        ref_host = host[group].get("vmap")
        info["host_vs_vmap"] = own_host / ref_host if own_host is not None and ref_host else None


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds >= 1e-1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value * scale, spec)


def _speedup(ratio: float | None) -> str:
    return _fmt(1 / ratio if ratio else None, ".2f")


def _split_group(group: str) -> tuple[str, str]:
    """``"<mode> | <shape>"`` -> (mode, shape); a group without ``" | "`` is its own mode."""
    mode, _, shape = group.partition(" | ")
    return mode, shape


def _provider_rank(provider: str) -> int:
    return PROVIDER_ORDER.index(provider) if provider in PROVIDER_ORDER else len(PROVIDER_ORDER)


def _expected_providers(data: dict, mode: str) -> list[str]:
    """The providers a run benchmarks in ``mode``: from ``machine_info["providers"]`` (op or e2e);
    without it, every provider seen in a mode of the same kind; none for other groups."""
    kind = "op" if mode in OP_MODES else "e2e" if mode in E2E_MODES else None
    if kind is None:
        return []
    listed = (data["machine_info"].get("providers") or {}).get(kind)
    if listed is not None:
        return list(listed)
    modes = OP_MODES if kind == "op" else E2E_MODES
    return sorted({b["extra_info"]["provider"] for b in data["benchmarks"] if _split_group(b["group"])[0] in modes},
                  key=_provider_rank)


def _table_rows(data: dict) -> dict[str, dict[str, list[dict]]]:
    """mode -> shape -> one entry per provider in provider order: ``{"provider", "bench"}`` for a row,
    ``{"provider", "missing"}`` for an expected provider without one. Modes in :data:`MODE_TITLES`
    order (others after), shapes in the order they ran."""
    rows: dict[str, dict[str, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for bench in data["benchmarks"]:
        mode, shape = _split_group(bench["group"])
        rows[mode][shape][bench["extra_info"]["provider"]] = {"provider": bench["extra_info"]["provider"],
                                                             "bench": bench}
    missing = {(m["group"], m["provider"]): m for m in data.get("missing", [])}
    for group, provider in missing:
        mode, shape = _split_group(group)
        rows[mode][shape].setdefault(provider, {"provider": provider, "missing": missing[group, provider]})
    for mode, shapes in rows.items():
        for by_provider in shapes.values():
            for provider in _expected_providers(data, mode):
                by_provider.setdefault(provider, {"provider": provider, "missing": {"outcome": "absent",
                                                                                    "reason": "no row in the JSON"}})
    order = list(MODE_TITLES)
    return {mode: {shape: sorted(by_provider.values(), key=lambda e: _provider_rank(e["provider"]))
                   for shape, by_provider in shapes.items()}
            for mode, shapes in sorted(rows.items(), key=lambda item: order.index(item[0]) if item[0] in order
                                       else len(order))}


def machine_line(data: dict) -> str:
    m = data["machine_info"]
    return (f"{m.get('device', '?')} | {m.get('dtype', '?')} | torch {m.get('torch', '?')} | "
            f"triton {m.get('triton', '?')} | CUDA {m.get('cuda')} | {m.get('date', data.get('datetime', '?'))}")


def _gpu_state_text(state: dict | None) -> str:
    if not state:
        return "not recorded"
    if "error" in state:
        return state["error"]
    return (f"SM {state.get('clocks.sm')} (max {state.get('clocks.max.sm')}), mem {state.get('clocks.mem')}, "
            f"{state.get('temperature.gpu')} °C, {state.get('power.draw')} of {state.get('power.limit')}, "
            f"{state.get('pstate')}")


def _parts_lines(data: dict) -> list[str]:
    parts = data.get("parts") or [{"name": None, "machine_info": data["machine_info"],
                                   "datetime": data.get("datetime")}]
    lines = []
    for part in parts:
        m = part["machine_info"]
        label = f"`{part['name']}`: " if part["name"] else ""
        line = (f"- {label}{m.get('date', part.get('datetime', '?'))}, load average (1, 5, 15 min) at the end "
                f"{m.get('load_average_1_5_15m', '?')} on {m.get('cpu_count', '?')} cores")
        if m.get("device_type") == "cuda":
            line += (f"; GPU {m.get('device_uuid') or '(UUID not recorded)'}: at the start "
                     f"{_gpu_state_text(m.get('gpu_state_start'))}; at the end "
                     f"{_gpu_state_text(m.get('gpu_state_end'))}")
        lines.append(line)
    return lines


def _peaks_line(m: dict) -> str:
    line = (f"Peaks: {_fmt(m.get('peak_flops_per_s'), '.2f', 1e-12)} TFLOP/s, "
            f"{_fmt(m.get('peak_bytes_per_s'), '.1f', 1e-9)} GB/s ({m.get('peaks_source', '?')}).")
    if m.get("spec_peak_flops_per_s"):
        line += (f" Reference only, not used: {_fmt(m['spec_peak_flops_per_s'], '.1f', 1e-12)} TFLOP/s, "
                 f"{_fmt(m['spec_peak_bytes_per_s'], '.0f', 1e-9)} GB/s ({m.get('spec_source')}).")
    return line


def _method_text(m: dict) -> str:
    if m.get("device_type") == "cuda":
        flush = m.get("l2_flush_bytes")
        return ("`host`: median wall time per call, synchronised rounds of back-to-back calls (Python, "
                "dispatch and launches included; inputs stay in L2 between calls). `device`: median GPU "
                f"time per call with L2 flushed before each call ({_fmt(flush, '.0f', 2.0**-20)} MiB written, "
                f"L2 {_fmt(m.get('l2_cache_bytes'), '.0f', 2.0**-20)} MiB; the flush is not timed), `via`: "
                "`graph` = replays of the step captured in a CUDA graph (no host gaps), `events` = CUDA events "
                "around eager calls (host gaps count where a call's host cost exceeds the flush).")
    return ("`host`: median wall time per call (synchronised rounds, warm-up excluded). On a CPU there is no "
            "separate device: `device` is the host time (`via` = `wall`), and nothing flushes the caches.")


def _render_row(shape_cell: str, entry: dict, show_extra: bool) -> str:
    provider = entry["provider"]
    if "missing" in entry:
        missing = entry["missing"]
        cells = [f"**MISSING** ({missing.get('outcome', '?')}: {missing.get('reason', '?')})"] + ["—"] * (
            12 if show_extra else 11)
        return f"| {shape_cell} | {provider} | " + " | ".join(cells) + " |"
    bench = entry["bench"]
    info = bench["extra_info"]
    method = _METHOD_LABELS.get(info.get("device_method"), "—")
    peak, before = info.get("peak_memory_bytes"), info.get("memory_before_bytes")
    cells = [
        _fmt_time(_median(bench)), _fmt_time(info.get("device_s")), method,
        _fmt(info.get("tflops"), ".3g"), _fmt(info.get("gbps"), ".3g"),
        _fmt(info.get("time_vs_limit"), ".2f"), _speedup(info.get("time_vs_vmap")),
        _speedup(info.get("time_vs_vmap_paper")), _speedup(info.get("host_vs_vmap")),
        _fmt(peak, ".1f", 2.0**-20), _fmt(peak - before if peak is not None and before is not None else None, ".1f",
                                         2.0**-20),
        _fmt(info.get("load_1m"), ".1f"),
    ]
    if show_extra:
        cells.insert(5, _fmt(info.get("extra_bytes"), ".2f", 1e-6))
    return f"| {shape_cell} | {provider} | " + " | ".join(cells) + " |"


def _floor_lines(by_mode: dict[str, dict[str, list[dict]]]) -> list[str]:
    op_modes = [mode for mode in OP_MODES if mode in by_mode]
    if not op_modes:
        return []
    lines = ["## Floors of the op", "",
             "| shape | mode | GFLOP | MB | compute floor | memory floor |",
             "|---|---|---:|---:|---:|---:|"]
    for mode in op_modes:
        for shape, entries in by_mode[mode].items():
            info = next((e["bench"]["extra_info"] for e in entries
                         if "bench" in e and e["provider"] != "limit" and "flops" in e["bench"]["extra_info"]), None)
            if info is not None:
                lines.append(f"| {shape} | {mode} | {info['flops'] / 1e9:.3f} | {info['bytes'] / 1e6:.2f} | "
                             f"{_fmt_time(info['floor_compute_s'])} | {_fmt_time(info['floor_memory_s'])} |")
    return lines + [""]


def _notes(data: dict) -> list[str]:
    """Rows timed with events because graph capture failed; rows that failed after timing; rows
    dropped as duplicates when merging."""
    notes = []
    for bench in data["benchmarks"]:
        error = bench["extra_info"].get("graph_error")
        if error and error.startswith("capture failed"):
            notes.append(f"- `{bench['group']}` {bench['extra_info']['provider']}: device time from events, {error}")
    for failure in data.get("failed_after_timing", []):
        notes.append(f"- `{failure['group']}` {failure['provider']}: the row was timed, then its test failed: "
                     f"{failure['reason']}")
    for dup in data.get("duplicates", []):
        notes.append(f"- `{dup['group']}` {dup['provider']}: also in `{dup['dropped_from']}` (median "
                     f"{_fmt_time(dup['dropped_median'])}, device {_fmt_time(dup['dropped_device_s'])}), dropped; "
                     f"the row shown is `{dup['kept_from']}`'s (median {_fmt_time(dup['kept_median'])}, device "
                     f"{_fmt_time(dup['kept_device_s'])})")
    return ["## Notes", "", *notes, ""] if notes else []


def render_markdown(data: dict, title: str) -> str:
    """The report for one pytest-benchmark JSON or a :func:`merge_runs` result (ratios are recomputed
    from its times)."""
    add_ratios(data["benchmarks"])
    m = data["machine_info"]
    lines = [f"# {title}", "", f"**Machine:** {machine_line(data)}", "", *_parts_lines(data), "",
             _peaks_line(m) + f" Fused backends on this machine: {', '.join(m.get('fused_backends') or []) or 'none'}.",
             "",
             _method_text(m) + " TFLOP/s and GB/s divide the op's unavoidable FLOPs and bytes by the device time "
             "(the same numerator for every LoRA provider; `limit` counts its own). `× limit` = device time / "
             "device time of `limit`; `vmap ÷`, `paper ÷` = device time of `vmap` / `vmap_paper` over the row's "
             "(> 1: faster than the paper's code); `host vmap ÷`: the same with host times. `fwd +MB`: bytes the "
             "provider moves that inference does not need (the library's backends write `x A^T` in fp32 for a "
             "backward that never comes). Memory, for one training step: `peak MiB` = the most in use (CUDA: "
             "every live tensor; CPU: the tensors the step touches), `step MiB` = peak minus what was in use "
             "when the step started. `load`: the 1-minute load average after the row ran (above the core count, "
             "other processes shared the cores and the host times are inflated).",
             ""]
    by_mode = _table_rows(data)
    lines += _floor_lines(by_mode)
    for mode, shapes in by_mode.items():
        show_extra = mode == "fwd"
        extra_head, extra_rule = (" fwd +MB |", "---:|") if show_extra else ("", "")
        lines += [f"## {MODE_TITLES.get(mode, mode)}", "",
                  f"| shape | provider | host | device | via | TFLOP/s | GB/s |{extra_head} × limit | vmap ÷ | "
                  "paper ÷ | host vmap ÷ | peak MiB | step MiB | load |",
                  f"|---|---|---:|---:|---|---:|---:|{extra_rule}---:|---:|---:|---:|---:|---:|---:|"]
        for shape, entries in shapes.items():
            for i, entry in enumerate(entries):
                lines.append(_render_row(shape if i == 0 else "", entry, show_extra))
        lines.append("")
    lines += _notes(data)
    return "\n".join(lines)


def render_plot(data: dict, path: Path) -> None:
    """One panel per mode that has ``vmap`` rows: bars of the device-time speedup over ``vmap`` (log
    scale) per provider and shape; a MISSING provider has no bar."""
    from lora_ensemble._optional import optional_dependency  # here: the tables need neither torch nor matplotlib

    with optional_dependency("benchmarks.report's plot"):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

    add_ratios(data["benchmarks"])
    by_mode = {mode: shapes for mode, shapes in _table_rows(data).items()
               if any(e["provider"] == "vmap" and "bench" in e for entries in shapes.values() for e in entries)}
    colors = plt.get_cmap("tab20")  # one colour per provider in every panel
    panels = max(len(by_mode), 1)  # a figure with one empty panel when no group has vmap
    fig, axes = plt.subplots(panels, 1, figsize=(14, 3.6 * panels), squeeze=False)
    for ax, (mode, shapes) in zip(axes[:, 0], by_mode.items()):
        providers = sorted({e["provider"] for entries in shapes.values() for e in entries if "bench" in e},
                           key=_provider_rank)
        width = 0.8 / max(len(providers), 1)
        for j, provider in enumerate(providers):
            speedups = []
            for entries in shapes.values():
                ratio = next((e["bench"]["extra_info"].get("time_vs_vmap") for e in entries
                              if e["provider"] == provider and "bench" in e), None)
                speedups.append(1 / ratio if ratio else float("nan"))
            ax.bar([i + (j - (len(providers) - 1) / 2) * width for i in range(len(shapes))], speedups, width,
                   label=provider, color=colors(_provider_rank(provider) % 20))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(list(shapes), rotation=15, ha="right", fontsize=8)
        ax.set_ylabel("speedup over vmap")
        ax.set_title(MODE_TITLES.get(mode, mode), fontsize=10)
        ax.legend(fontsize=7, ncol=max(len(providers), 1), loc="upper left")
    fig.suptitle(machine_line(data) + " (device time)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _commit(run: dict) -> str | None:
    return (run.get("commit_info") or {}).get("id")


def merge_runs(runs: list[dict], names: list[str] | None = None) -> dict:
    """One report's data from several JSONs of one machine and software (a suite run in parts).

    Raises ValueError, naming the field and each file's value, when the runs differ in any of
    :data:`MERGE_FIELDS` or in their commit. A row (group and provider) present in several runs is
    kept once, the first run's; the others are listed under ``"duplicates"`` with their times. A
    missing row (skipped or failed) that another run has is not missing; a failure recorded for a
    row that was timed (in this run or another) goes to ``"failed_after_timing"``. The first run's
    ``machine_info`` is kept, and every run's under ``"parts"``."""
    names = names or [f"run {i + 1}" for i in range(len(runs))]
    checks = {field: [run["machine_info"].get(field) for run in runs] for field in MERGE_FIELDS}
    checks["commit"] = [_commit(run) for run in runs]
    for field, values in checks.items():
        if len(set(map(str, values))) > 1:
            listed = ", ".join(f"{name}: {value!r}" for name, value in zip(names, values))
            raise ValueError(f"runs with different {field} cannot share a report ({listed})")
    kept: dict[tuple[str, str], tuple[str, dict]] = {}
    duplicates = []
    for name, run in zip(names, runs):
        for bench in run["benchmarks"]:
            key = (bench["group"], bench["extra_info"]["provider"])
            if key not in kept:
                kept[key] = (name, bench)
                continue
            first_name, first = kept[key]
            duplicates.append({"group": key[0], "provider": key[1], "kept_from": first_name, "dropped_from": name,
                               "kept_median": _median(first), "kept_device_s": _device_s(first),
                               "dropped_median": _median(bench), "dropped_device_s": _device_s(bench)})
    missing, failed_after_timing = {}, []
    for run in runs:
        for entry in run.get("missing", []):
            key = (entry["group"], entry["provider"])
            if key in kept:
                if entry.get("outcome") == "failed":
                    failed_after_timing.append(entry)
            else:
                missing.setdefault(key, entry)
    return {**runs[0], "benchmarks": [bench for _, bench in kept.values()], "missing": list(missing.values()),
            "duplicates": duplicates, "failed_after_timing": failed_after_timing,
            "parts": [{"name": name, "machine_info": run["machine_info"], "datetime": run.get("datetime")}
                      for name, run in zip(names, runs)] if len(runs) > 1 else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, nargs="+", help="pytest-benchmark --benchmark-json files of one machine")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: the first JSON's directory")
    parser.add_argument("--name", default=None, help="output file stem (default: the first JSON's)")
    args = parser.parse_args(argv)
    try:
        data = merge_runs([json.loads(path.read_text()) for path in args.json], [path.name for path in args.json])
    except ValueError as exc:
        parser.error(str(exc))
    out_dir = args.out_dir or args.json[0].parent
    name = args.name or args.json[0].stem
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, png_path = out_dir / f"{name}.md", out_dir / f"{name}.png"
    markdown = render_markdown(data, f"LoRA-Ensemble benchmarks: {name}")
    md_path.write_text(markdown + f"\n![speedup over vmap]({png_path.name})\n")
    render_plot(data, png_path)
    if data["duplicates"]:
        print(f"{len(data['duplicates'])} duplicate rows dropped (listed under Notes)")
    print(f"wrote {md_path} and {png_path}")


if __name__ == "__main__":
    main()
