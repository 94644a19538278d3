"""Turn ``pytest benchmarks/ --benchmark-json=FILE.json`` output into ``FILE.md`` and ``FILE.png``.

    python -m benchmarks.report benchmarks/results/cpu.json [--out-dir DIR]
    python -m benchmarks.report part1.json part2.json --name h100   # a suite run in parts

The markdown holds the machine line (device, dtype, torch, triton, CUDA, date, where the peaks
come from), the floors of every op shape, and one table per mode with, for every provider of a
shape: the median time, achieved TFLOP/s and GB/s (against the op's unavoidable FLOPs and bytes,
see :mod:`benchmarks.cost_model`), the time ratio to ``limit``, the speedup over ``vmap`` and the
peak memory of the training step. The plot shows the speedup over ``vmap`` per provider and shape.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

__all__ = ["PROVIDER_ORDER", "add_ratios", "main", "merge_runs", "render_markdown", "render_plot"]

PROVIDER_ORDER: tuple[str, ...] = (
    "triton", "cuda", "graphed", "bmm", "compiled", "vmap", "vmap_paper", "vmap_shared_w0", "sequential", "explicit", "limit")
MODE_TITLES: dict[str, str] = {
    "fwd": "Forward (inference, no autograd graph)",
    "bwd": "Backward (replayed backward of one forward)",
    "fwd_bwd": "Forward + backward (training step of the layer)",
    "e2e_infer": "End to end: ensemble inference",
    "e2e_train": "End to end: training step (forward, cross-entropy, backward)",
}


def _median(bench: dict) -> float | None:
    stats = bench.get("stats")
    return stats["median"] if stats else None


def add_ratios(benchmarks: list[dict]) -> None:
    """Set ``extra_info["time_vs_limit"]`` and ``["time_vs_vmap"]`` of every row: its median time
    over the median of ``limit`` / ``vmap`` in the same group (None where either is missing)."""
    medians: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in benchmarks:
        median = _median(bench)
        if median is not None:
            medians[bench["group"]][bench["extra_info"]["provider"]] = median
    for bench in benchmarks:
        own, group = _median(bench), medians.get(bench["group"], {})
        for ref in ("limit", "vmap"):
            ratio = own / group[ref] if own is not None and ref in group else None
            bench["extra_info"][f"time_vs_{ref}"] = ratio


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


def _rows_by_mode(benchmarks: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """mode -> shape -> rows in provider order; modes in :data:`MODE_TITLES` order, shapes in the
    order they ran."""
    out: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for bench in benchmarks:
        info = bench["extra_info"]
        out[info["mode"]][info["shape"]].append(bench)
    for shapes in out.values():
        for rows in shapes.values():
            rows.sort(key=lambda b: PROVIDER_ORDER.index(b["extra_info"]["provider"]))
    order = list(MODE_TITLES)
    return dict(sorted(out.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


def machine_line(data: dict) -> str:
    m = data["machine_info"]
    return (f"{m.get('device', '?')} | {m.get('dtype', '?')} | torch {m.get('torch', '?')} | "
            f"triton {m.get('triton', '?')} | CUDA {m.get('cuda')} | {m.get('date', data.get('datetime', '?'))}")


def render_markdown(data: dict, title: str) -> str:
    """The report for one pytest-benchmark JSON (ratios are recomputed from its medians)."""
    benchmarks = data["benchmarks"]
    add_ratios(benchmarks)
    m = data["machine_info"]
    lines = [f"# {title}", "", f"**Machine:** {machine_line(data)}", "",
             f"Peaks: {_fmt(m.get('peak_flops_per_s'), '.2f', 1e-12)} TFLOP/s, "
             f"{_fmt(m.get('peak_bytes_per_s'), '.1f', 1e-9)} GB/s ({m.get('peaks_source', '?')}). "
             f"Fused backends on this machine: {', '.join(m.get('fused_backends') or []) or 'none'}. "
             f"Load average (1, 5, 15 min) when the JSON was written: {m.get('load_average_1_5_15m', '?')} "
             f"on {m.get('cpu_count', '?')} cores.", "",
             "Times are medians per call (synchronizing timer, warm-up excluded). TFLOP/s and GB/s divide "
             "the op's unavoidable FLOPs and bytes by the time (the same numerator for every LoRA provider; "
             "`limit` counts its own). `× limit` = time / time of `limit`; `vmap ÷` = time of `vmap` / "
             "time (> 1: faster than the paper's vmap). Peak memory: one training step, live inputs included. "
             "`load`: the 1-minute load average after the row ran (above the core count, other processes "
             "shared the cores and the times are inflated).",
             ""]
    by_mode = _rows_by_mode(benchmarks)
    op_modes = [mode for mode in ("fwd", "bwd", "fwd_bwd") if mode in by_mode]
    if op_modes:
        lines += ["## Floors of the op", "",
                  "| shape | mode | GFLOP | MB | compute floor | memory floor |",
                  "|---|---|---:|---:|---:|---:|"]
        for mode in op_modes:
            for shape, rows in by_mode[mode].items():
                info = next((r["extra_info"] for r in rows if r["extra_info"]["provider"] != "limit"), None)
                if info is None:
                    continue
                lines.append(f"| {shape} | {mode} | {info['flops'] / 1e9:.3f} | {info['bytes'] / 1e6:.2f} | "
                             f"{_fmt_time(info['floor_compute_s'])} | {_fmt_time(info['floor_memory_s'])} |")
        lines.append("")
    for mode, shapes in by_mode.items():
        lines += [f"## {MODE_TITLES.get(mode, mode)}", "",
                  "| shape | provider | median | min | TFLOP/s | GB/s | × limit | vmap ÷ | peak MiB | load |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for shape, rows in shapes.items():
            for i, bench in enumerate(rows):
                info = bench["extra_info"]
                ratio_vmap = info.get("time_vs_vmap")
                lines.append(
                    f"| {shape if i == 0 else ''} | {info['provider']} | {_fmt_time(_median(bench))} | "
                    f"{_fmt_time(bench['stats']['min'] if bench.get('stats') else None)} | "
                    f"{_fmt(info.get('tflops'), '.3g')} | {_fmt(info.get('gbps'), '.3g')} | "
                    f"{_fmt(info.get('time_vs_limit'), '.2f')} | "
                    f"{_fmt(1 / ratio_vmap if ratio_vmap else None, '.2f')} | "
                    f"{_fmt(info.get('peak_memory_bytes'), '.1f', 2.0**-20)} | {_fmt(info.get('load_1m'), '.1f')} |")
        lines.append("")
    return "\n".join(lines)


def render_plot(data: dict, path: Path) -> None:
    """One panel per mode: bars of the speedup over ``vmap`` (log scale) per provider and shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    add_ratios(data["benchmarks"])
    by_mode = _rows_by_mode(data["benchmarks"])
    colors = plt.get_cmap("tab10")  # one colour per provider in every panel
    fig, axes = plt.subplots(len(by_mode), 1, figsize=(14, 3.6 * len(by_mode)), squeeze=False)
    for ax, (mode, shapes) in zip(axes[:, 0], by_mode.items()):
        providers = [p for p in PROVIDER_ORDER
                     if any(r["extra_info"]["provider"] == p for rows in shapes.values() for r in rows)]
        width = 0.8 / max(len(providers), 1)
        for j, provider in enumerate(providers):
            speedups = []
            for rows in shapes.values():
                ratio = next((r["extra_info"].get("time_vs_vmap") for r in rows
                              if r["extra_info"]["provider"] == provider), None)
                speedups.append(1 / ratio if ratio else float("nan"))
            ax.bar([i + (j - (len(providers) - 1) / 2) * width for i in range(len(shapes))], speedups, width,
                   label=provider, color=colors(PROVIDER_ORDER.index(provider)))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(list(shapes), rotation=15, ha="right", fontsize=8)
        ax.set_ylabel("speedup over vmap")
        ax.set_title(MODE_TITLES.get(mode, mode), fontsize=10)
        ax.legend(fontsize=7, ncol=len(providers), loc="upper left")
    fig.suptitle(machine_line(data), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge_runs(runs: list[dict]) -> dict:
    """One report's data from several JSONs of the same machine (a suite split into parts): the
    first run's machine info, every run's rows."""
    devices = {run["machine_info"].get("device") for run in runs}
    if len(devices) != 1:
        raise ValueError(f"runs from different devices cannot share a report: {sorted(map(str, devices))}")
    return {**runs[0], "benchmarks": [bench for run in runs for bench in run["benchmarks"]]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, nargs="+", help="pytest-benchmark --benchmark-json files of one machine")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: the first JSON's directory")
    parser.add_argument("--name", default=None, help="output file stem (default: the first JSON's)")
    args = parser.parse_args(argv)
    data = merge_runs([json.loads(path.read_text()) for path in args.json])
    out_dir = args.out_dir or args.json[0].parent
    name = args.name or args.json[0].stem
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, png_path = out_dir / f"{name}.md", out_dir / f"{name}.png"
    markdown = render_markdown(data, f"LoRA-Ensemble benchmarks: {name}")
    md_path.write_text(markdown + f"\n![speedup over vmap]({png_path.name})\n")
    render_plot(data, png_path)
    print(f"wrote {md_path} and {png_path}")


if __name__ == "__main__":
    main()
