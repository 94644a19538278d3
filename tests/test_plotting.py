"""``reliability_diagram``, headless: every colour drawn is in the legend, no bars overlap, the count
panels show the bin counts, and bins from the streaming metrics draw the same as probabilities."""

from __future__ import annotations

import pytest
import torch

from lora_ensemble import metrics
from lora_ensemble.evaluation import EnsembleMetrics
from lora_ensemble.plotting import reliability_diagram

from .test_metrics import random_ensemble

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def legend_of(fig) -> matplotlib.legend.Legend:
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    assert len(legends) == 1
    return legends[0]


def drawn_bars(ax) -> list:
    return [patch for container in ax.containers for patch in container]


def check_figure(fig, bins: dict[str, metrics.ReliabilityBins]) -> None:
    reliability_axes, count_axes = fig.axes[:len(bins)], fig.axes[len(bins):]
    legend = legend_of(fig)
    legend_labels = {text.get_text() for text in legend.get_texts()}
    legend_colours = {to_rgba(handle.get_facecolor()) for handle in legend.legend_handles
                      if hasattr(handle, "get_facecolor")}
    for ax in fig.axes:
        # every labelled artist is in the legend, and every bar's colour is a legend entry's colour
        labels = {c.get_label() for c in ax.containers} | {line.get_label() for line in ax.get_lines()}
        assert labels <= legend_labels, labels - legend_labels
        for bar in drawn_bars(ax):
            assert to_rgba(bar.get_facecolor()) in legend_colours
    for ax, count_ax, (name, model_bins) in zip(reliability_axes, count_axes, bins.items(), strict=True):
        assert name in ax.get_title() and f"({model_bins.n_bins} bins)" in ax.get_title()
        assert f"ECE {model_bins.ece().item():.4f}" in ax.get_title()
        filled = model_bins.count > 0
        assert [bar.get_height() for bar in drawn_bars(count_ax)] == model_bins.count[filled].tolist()
        assert [text.get_text() for text in count_ax.texts] == [str(int(c)) for c in model_bins.count[filled]]
        # no two bars overlap: per bin, the stacked segments tile [0, accuracy] and end at the accuracy
        segments: dict[float, list[tuple[float, float]]] = {}
        for bar in drawn_bars(ax):
            segments.setdefault(round(bar.get_x(), 9), []).append((bar.get_y(), bar.get_y() + bar.get_height()))
        assert len(segments) == int(filled.sum())
        for stack, accuracy, confidence in zip(sorted(segments), model_bins.accuracy[filled],
                                               model_bins.confidence[filled], strict=True):
            spans = sorted(segments[stack])
            assert all(low_end <= high_start + 1e-12 for (_, low_end), (high_start, _) in zip(spans, spans[1:]))
            assert spans[-1][1] == pytest.approx(max(accuracy.item(), confidence.item()))


def test_models_side_by_side_with_counts_and_a_legend_for_every_colour() -> None:
    logits, targets = random_ensemble(4, 250, 5, seed=0)
    probs = {"single": logits[0].softmax(-1), "ensemble": metrics.ensemble_probs(logits),
             "ensemble (paper's convention)": metrics.ensemble_probs(logits, "mean_logits")}
    fig = reliability_diagram(probs, targets, n_bins=10)
    bins = {name: metrics.reliability_bins(p, targets, 10) for name, p in probs.items()}
    check_figure(fig, bins)
    drawn = {c.get_label() for ax in fig.axes for c in ax.containers}
    assert {"gap: accuracy above confidence", "gap: confidence above accuracy"} <= drawn  # both kinds shown


def test_bins_from_the_streaming_metrics_draw_like_probabilities() -> None:
    logits, targets = random_ensemble(3, 120, 4, seed=1)
    evaluation = EnsembleMetrics()
    for chunk, chunk_targets in zip(logits.split(50, dim=1), targets.split(50), strict=True):
        evaluation.update(chunk, chunk_targets)
    streamed = evaluation.reliability_bins()
    fig = reliability_diagram({"streamed": streamed, "whole": metrics.ensemble_probs(logits)}, targets)
    check_figure(fig, {"streamed": streamed, "whole": metrics.reliability_bins(metrics.ensemble_probs(logits),
                                                                                   targets)})
    heights = [[bar.get_height() for bar in drawn_bars(ax)] for ax in fig.axes[:2]]
    assert heights[0] == pytest.approx(heights[1], abs=1e-12)


def test_into_given_axes() -> None:
    logits, targets = random_ensemble(2, 40, 3, seed=2)
    fig, axes = plt.subplots(2, 1, squeeze=False)
    assert reliability_diagram({"model": metrics.ensemble_probs(logits)}, targets, axes=axes) is fig
    assert axes[0][0].get_legend() is not None
    check_figure(fig, {"model": metrics.reliability_bins(metrics.ensemble_probs(logits), targets)})


def test_bad_input() -> None:
    probs = torch.full((3, 2), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"targets is needed for models\['a'\], probabilities of shape \(3, 2\)"):
        reliability_diagram({"a": probs})
    with pytest.raises(TypeError, match="models must be a non-empty mapping"):
        reliability_diagram(probs, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"models\['a'\] must be a Tensor of probabilities or ReliabilityBins"):
        reliability_diagram({"a": probs.tolist()}, torch.zeros(3, dtype=torch.long))
    fig, axes = plt.subplots(1, 2, squeeze=False)
    with pytest.raises(ValueError, match="axes must be 2 rows of 1 axes"):
        reliability_diagram({"a": probs}, torch.zeros(3, dtype=torch.long), axes=axes)
    with pytest.raises(ValueError, match="1 of 3 samples have NaN"):
        reliability_diagram({"a": probs.index_fill(0, torch.tensor([1]), float("nan"))}, torch.zeros(3).long())
