"""Reliability diagrams with per-bin counts. matplotlib (the ``models`` extra) is imported on first use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from . import metrics
from ._optional import optional_dependency
from .metrics import NonFinite, ReliabilityBins

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["reliability_diagram"]

# (legend label, colour) of each kind of bar; the legend names every one that is drawn.
ACCURACY = ("accuracy", "tab:blue")
UNDERCONFIDENT = ("gap: accuracy above confidence", "tab:green")
OVERCONFIDENT = ("gap: confidence above accuracy", "tab:red")
COUNTS = ("samples in bin", "0.6")
DIAGONAL = "perfect calibration"


def reliability_diagram(models: Mapping[str, Tensor | ReliabilityBins], targets: Tensor | None = None,
                        n_bins: int = 15, *, axes: Sequence[Sequence[Axes]] | None = None,
                        nonfinite: NonFinite = "raise") -> Figure:
    """Reliability diagrams of several models side by side, each above a panel of per-bin sample counts.

    Column ``m`` shows model ``m``. Top: for each non-empty confidence bin, a bar as high as the
    bin's accuracy, split at the bin's mean confidence: the part below both is "accuracy"; the gap
    between accuracy and confidence is green where accuracy is higher (underconfident, inside the
    bar) and red where confidence is higher (overconfident, on top of it); the dashed diagonal is
    perfect calibration and the title gives the ECE, its bin count and the sample count. Bottom: the
    samples in each bin (log scale, each bar labelled with its count). No two bars overlap, and one
    legend names every colour drawn.

    Args:
        models: name -> probabilities ``[B, C]`` of that model (for an ensemble,
            :func:`~lora_ensemble.metrics.ensemble_probs` of its member logits, under the convention
            you report), or :class:`~lora_ensemble.metrics.ReliabilityBins` (e.g.
            :meth:`EnsembleMetrics.reliability_bins() <lora_ensemble.evaluation.EnsembleMetrics.reliability_bins>`).
        targets: ``[B]`` class indices; needed when ``models`` holds probabilities.
        n_bins: equal-width confidence bins for probabilities (default 15; the paper used 10). Bins
            passed in keep their own count.
        axes: ``axes[0][m]`` and ``axes[1][m]``, the reliability and count panels of model ``m``, to draw
            into; by default a new figure (via ``matplotlib.pyplot``, so ``plt.show()`` shows it).
        nonfinite: samples with NaN or Inf probabilities: ``"raise"`` or ``"skip"``.

    Returns:
        The figure drawn into.
    """
    if not isinstance(models, Mapping) or not models:
        raise TypeError(f"models must be a non-empty mapping name -> probabilities or ReliabilityBins, "
                        f"got {type(models).__name__} {models!r:.80}")
    all_bins = {}
    for name, value in models.items():
        if isinstance(value, ReliabilityBins):
            all_bins[name] = value
        elif isinstance(value, Tensor):
            if targets is None:
                raise ValueError(f"targets is needed for models[{name!r}], probabilities of shape {tuple(value.shape)}")
            all_bins[name] = metrics.reliability_bins(value, targets, n_bins, nonfinite=nonfinite)
        else:
            raise TypeError(f"models[{name!r}] must be a Tensor of probabilities or ReliabilityBins, "
                            f"got {type(value).__name__}")
        if all_bins[name].count.sum() == 0:
            raise ValueError(f"models[{name!r}] has no samples in its bins")
    if axes is None:
        with optional_dependency("reliability_diagram"):
            import matplotlib.pyplot as plt
        fig, axes = plt.subplots(2, len(all_bins), figsize=(3.4 * len(all_bins), 5.0), sharex="col", sharey="row",
                                 height_ratios=[3, 1], squeeze=False, layout="constrained")
    elif len(axes) != 2 or any(len(row) != len(all_bins) for row in axes):
        raise ValueError(f"axes must be 2 rows of {len(all_bins)} axes (one column per model), got rows of "
                         f"{[len(row) for row in axes]}")
    else:
        fig = axes[0][0].figure

    most = max(float(bins.count.max()) for bins in all_bins.values())
    for column, (name, bins) in enumerate(all_bins.items()):
        _draw(axes[0][column], axes[1][column], name, bins, count_limit=4 * most)
    axes[0][0].set_ylabel("accuracy")
    axes[1][0].set_ylabel("samples")

    handles = {}
    for ax in (*axes[0], *axes[1]):
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    order = [label for label, _ in (ACCURACY, UNDERCONFIDENT, OVERCONFIDENT)] + [DIAGONAL, COUNTS[0]]
    rank = {label: order.index(label) if label in order else len(order) for label in handles}
    handles = {label: handles[label] for label in sorted(handles, key=rank.__getitem__)}
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    if isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine):  # room for a legend below the panels
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=3, fontsize=8)
    else:
        axes[0][0].legend(handles.values(), handles.keys(), loc="upper left", fontsize=7)
    return fig


def _draw(ax: Axes, count_ax: Axes, name: str, bins: ReliabilityBins, count_limit: float) -> None:
    """One model's column: the reliability panel ``ax`` and the per-bin counts ``count_ax`` (log scale up
    to ``count_limit``, the same for every column)."""
    centers = ((bins.edges[:-1] + bins.edges[1:]) / 2).cpu().numpy()
    accuracy, confidence, count = (t.cpu().numpy() for t in (bins.accuracy, bins.confidence, bins.count))
    width = 1 / bins.n_bins
    filled = count > 0
    lower = accuracy.clip(max=confidence)
    bars = (  # (label, colour), which bins, bottom, top
        (ACCURACY, filled, 0 * lower, lower),
        (UNDERCONFIDENT, filled & (accuracy > confidence), confidence, accuracy),
        (OVERCONFIDENT, filled & (confidence > accuracy), accuracy, confidence),
    )
    for (label, colour), where, bottom, top in bars:
        if where.any():
            ax.bar(centers[where], (top - bottom)[where], width, bottom=bottom[where], color=colour,
                   edgecolor="black", linewidth=0.5, label=label)
    ax.plot([0, 1], [0, 1], linestyle="--", color="black", linewidth=1, label=DIAGONAL)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    total = int(count.sum())
    ax.set_title(f"{name}\nECE {float(bins.ece()):.4f} ({bins.n_bins} bins), {total} samples", fontsize=9)

    label, colour = COUNTS
    counts = count_ax.bar(centers[filled], count[filled], width, color=colour, edgecolor="black", linewidth=0.5,
                          label=label)
    count_ax.bar_label(counts, fmt="%d", fontsize=6)
    count_ax.set_yscale("log")
    count_ax.set_ylim(0.5, count_limit)
    count_ax.set_xticks([0, 0.25, 0.5, 0.75, 1], ["0", "0.25", "0.5", "0.75", "1"])
    count_ax.set_xlabel("confidence")
