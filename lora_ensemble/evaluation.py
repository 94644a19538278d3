"""Ensemble metrics accumulated over batches and synchronised across processes.

:class:`EnsembleMetrics` takes member logits batch by batch (``update``), keeps sufficient
statistics (sums and per-bin sums, so memory does not grow with the test set) plus, optionally, a few
per-sample scores for selective prediction and OOD detection, and returns on ``compute`` exactly what
the whole-tensor functions of :mod:`lora_ensemble.metrics` return on the concatenated test set (to
float64 rounding). Under ``torch.distributed`` the statistics are all-reduced and the per-sample scores
all-gathered, so every rank gets the metrics of the whole, sharded test set.

Example::

    evaluation = EnsembleMetrics(n_bins=15)             # the paper: n_bins=10, convention="mean_logits"
    for images, labels in loader:
        evaluation.update(ensemble(images), labels)     # member logits [N, B, C]
    results = evaluation.compute()                      # accuracy, ece, nll, brier, disagreement, ...
    scores = evaluation.scores()                        # per-sample entropy, MI, confidence, correct
    metrics.aurc(scores["predictive_entropy"], scores["correct"])
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import metrics
from .metrics import Convention, NonFinite, ReliabilityBins

__all__ = ["EnsembleMetrics"]

# Order of the scalar sums kept before the [3, n_bins] bin sums in one float64 state vector.
_SCALARS = ("samples", "correct", "nll", "brier", "disagreement", "skipped")
_SCORE_NAMES: tuple[str, ...] = ("confidence", "predictive_entropy", "mutual_information", "correct")


class EnsembleMetrics:
    """Accuracy, ECE, NLL, Brier score and disagreement of an ensemble over a test set seen in batches.

    Args:
        n_bins: equal-width confidence bins ``(i/n, (i+1)/n]`` of the ECE; 15 by default (torchmetrics'
            default), the paper used 10.
        convention: which ensemble prediction accuracy, ECE, the reliability bins and the per-sample
            ``confidence`` / ``correct`` scores use. ``"mean_probs"`` (default): the mean of the member
            probabilities. ``"mean_logits"``: the softmax of the mean member logits, as the paper's code
            computes its accuracy and ECE. NLL, Brier, the entropies and mutual information always use
            the mean of the member probabilities (in the paper's code too).
        nonfinite: samples whose probabilities are not finite in some member (logits with NaN or +Inf,
            or with no finite entry): ``"raise"`` a ``ValueError`` in ``update`` that counts them
            (nothing is accumulated), or ``"skip"`` them (``compute()["skipped"]`` counts them).
        keep_scores: keep per-sample scores (4 float64 values a sample) for :meth:`scores`.
        process_group: the group to synchronise over (default: the whole world).
        sync_on_compute: when ``torch.distributed`` is initialised with more than one process,
            ``compute``, ``reliability_bins`` and ``scores`` are collectives over ``process_group``:
            every rank must call them, and each returns the result for the union of all ranks' samples.
            False keeps them local.

    The state lives on the device of the first update's inputs; later updates must use the same one.
    """

    def __init__(self, n_bins: int = 15, convention: Convention = "mean_probs", *, nonfinite: NonFinite = "raise",
                 keep_scores: bool = True, process_group: dist.ProcessGroup | None = None,
                 sync_on_compute: bool = True) -> None:
        metrics._check_n_bins(n_bins)
        metrics._check_choice("convention", convention, metrics._CONVENTIONS)
        metrics._check_choice("nonfinite", nonfinite, metrics._NONFINITE_CHOICES)
        self.n_bins, self.convention, self.nonfinite = n_bins, convention, nonfinite
        self.keep_scores, self.process_group, self.sync_on_compute = keep_scores, process_group, sync_on_compute
        self.reset()

    def reset(self) -> None:
        """Forget every sample seen so far."""
        self._shape: tuple[int, int] | None = None  # (members N, classes C) of the updates so far
        self._sums: Tensor | None = None  # float64 [len(_SCALARS) + 3 * n_bins]
        self._scores: list[Tensor] = []  # float64 [B_i, len(_SCORE_NAMES)] per update

    def update(self, logits: Tensor, targets: Tensor) -> None:
        """Add a batch.

        Args:
            logits: member logits ``[N, B, C]`` (e.g. ``ensemble(x)``), or ``[B, C]`` for one model.
                Log-probabilities are logits too. ``N`` and ``C`` must stay the same across updates.
            targets: ``[B]`` class indices.

        Raises:
            ValueError / TypeError: bad shapes, dtypes or class indices, or (``nonfinite="raise"``)
                samples with NaN or Inf; the state is left as it was.
        """
        metrics._check_floating("logits", logits)
        if logits.dim() not in (2, 3):
            raise ValueError(f"logits must be member logits [N, B, C] or [B, C], got shape {tuple(logits.shape)}")
        members = logits if logits.dim() == 3 else logits.unsqueeze(0)
        shape = (members.shape[0], members.shape[2])
        if self._shape is not None and shape != self._shape:
            raise ValueError(f"logits shape {tuple(logits.shape)} has (members, classes) = {shape}, but earlier "
                             f"updates had {self._shape}; call reset() to start a new evaluation")
        metrics._check_targets(targets, shape[1], "logits", tuple(logits.shape))
        if targets.device != logits.device:
            raise ValueError(f"targets is on {targets.device} but logits on {logits.device}")
        if self._sums is not None and logits.device != self._sums.device:
            raise ValueError(f"logits is on {logits.device} but earlier updates were on {self._sums.device}")

        member_probs = members.detach().double().softmax(dim=-1)
        mean_probs = member_probs.mean(dim=0)
        prediction = (mean_probs if self.convention == "mean_probs"
                      else metrics.ensemble_probs(members.detach(), self.convention))
        finite = metrics._finite_samples(member_probs, 1) & metrics._finite_samples(prediction, 0)
        keep = metrics._select_finite(finite, self.nonfinite, "logits", metrics._FROM_LOGITS)
        targets = targets.long()
        if keep is not None:
            member_probs, mean_probs, prediction, targets = (
                member_probs[:, keep], mean_probs[keep], prediction[keep], targets[keep])

        confidence, correct = metrics._confidence_and_correct(prediction, targets)
        zero = torch.zeros((), dtype=torch.float64, device=confidence.device)
        scalars = torch.stack([
            zero + targets.numel(),
            correct.double().sum(),
            metrics._nll_terms(mean_probs, targets).sum(),
            metrics._brier_terms(mean_probs, targets).sum(),
            metrics.disagreement(member_probs).sum() if shape[0] > 1 else zero,
            zero if keep is None else (~keep).double().sum(),
        ])
        sums = torch.cat([scalars, metrics._bin_sums(confidence, correct, self.n_bins).flatten()])
        self._sums = sums if self._sums is None else self._sums + sums
        self._shape = shape
        if self.keep_scores:
            self._scores.append(torch.stack([confidence, metrics.entropy(mean_probs),
                                             metrics.mutual_information(member_probs), correct.double()], dim=1))

    def compute(self) -> dict[str, float]:
        """The metrics of every sample seen (on every rank when synchronised).

        Returns:
            ``accuracy``, ``ece`` (with ``n_bins`` bins), ``nll``, ``brier``, ``disagreement`` (the mean
            fraction of member pairs that disagree; only with ``N >= 2`` members), ``samples`` (counted)
            and ``skipped`` (left out as NaN or Inf).
        """
        shape, sums = self._synced_sums()
        scalars = dict(zip(_SCALARS, sums[:len(_SCALARS)].tolist(), strict=True))
        total = scalars["samples"]
        results = {
            "accuracy": scalars["correct"] / total,
            "ece": float(ReliabilityBins.from_sums(sums[len(_SCALARS):].view(3, -1)).ece()),
            "nll": scalars["nll"] / total,
            "brier": scalars["brier"] / total,
        }
        if shape[0] > 1:
            results["disagreement"] = scalars["disagreement"] / total
        results["samples"], results["skipped"] = int(total), int(scalars["skipped"])
        return results

    def reliability_bins(self) -> ReliabilityBins:
        """Per-bin confidence, accuracy and counts of every sample seen (for :func:`reliability_diagram
        <lora_ensemble.plotting.reliability_diagram>`)."""
        _, sums = self._synced_sums()
        return ReliabilityBins.from_sums(sums[len(_SCALARS):].view(3, -1))

    def scores(self) -> dict[str, Tensor]:
        """Per-sample scores ``[B_total]`` of every sample seen, in update order (rank 0's first when
        synchronised): ``confidence`` (top probability of the ``convention``'s prediction),
        ``predictive_entropy`` and ``mutual_information`` (float64, nats), ``correct`` (bool). Feed them
        to :func:`~lora_ensemble.metrics.aurc`, :func:`~lora_ensemble.metrics.risk_coverage`,
        :func:`~lora_ensemble.metrics.error_auroc` or :func:`~lora_ensemble.metrics.ood_auroc`."""
        if not self.keep_scores:
            raise RuntimeError("scores() needs EnsembleMetrics(keep_scores=True)")
        self._synced_sums()  # checks that there are samples and that every rank agrees on (N, C)
        local = (torch.cat(self._scores) if self._scores
                 else torch.zeros(0, len(_SCORE_NAMES), dtype=torch.float64))
        rows = self._gather_rows(local) if self._distributed() else local
        scores = dict(zip(_SCORE_NAMES, rows.unbind(dim=1), strict=True))
        scores["correct"] = scores["correct"].bool()
        return scores

    # --- synchronisation -------------------------------------------------------------------------

    def _distributed(self) -> bool:
        return (self.sync_on_compute and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def _collective_device(self) -> torch.device:
        """CPU for gloo; the current accelerator for NCCL and the other device backends."""
        if "gloo" in str(dist.get_backend(self.process_group)):
            return torch.device("cpu")
        accelerator = torch.accelerator.current_accelerator()
        return torch.device(accelerator.type, torch.accelerator.current_device_index())

    def _synced_sums(self) -> tuple[tuple[int, int], Tensor]:
        """``(N, C)`` and the state vector summed over ranks; raises when no rank has a sample."""
        empty = torch.zeros(len(_SCALARS) + 3 * self.n_bins, dtype=torch.float64)
        sums = self._sums if self._sums is not None else empty
        shape = self._shape
        if self._distributed():
            device = self._collective_device()
            local = torch.tensor([*(shape or (0, 0))], dtype=torch.int64, device=device)
            shapes = [torch.empty_like(local) for _ in range(dist.get_world_size(self.process_group))]
            dist.all_gather(shapes, local, group=self.process_group)
            per_rank = [tuple(s.tolist()) for s in shapes]
            seen = set(per_rank) - {(0, 0)}
            if len(seen) > 1:
                raise ValueError(f"ranks saw different (members, classes) shapes, rank by rank: {per_rank}")
            shape = seen.pop() if seen else None
            sums = sums.to(device, copy=True)  # all_reduce works in place; the local state stays local
            dist.all_reduce(sums, group=self.process_group)
        skipped = int(sums[_SCALARS.index("skipped")])
        if shape is None or sums[_SCALARS.index("samples")] == 0:
            raise ValueError("no samples to evaluate: call update() with at least one sample"
                             + (f" (all {skipped} seen were skipped as NaN or Inf)" if skipped else ""))
        return shape, sums

    def _gather_rows(self, local: Tensor) -> Tensor:
        """Concatenate every rank's ``[B_r, K]`` rows in rank order (padded ``all_gather``)."""
        device, group = self._collective_device(), self.process_group
        world = dist.get_world_size(group)
        length = torch.tensor([local.shape[0]], dtype=torch.int64, device=device)
        lengths = [torch.empty_like(length) for _ in range(world)]
        dist.all_gather(lengths, length, group=group)
        lengths = [int(n) for n in lengths]
        padded = torch.zeros(max(lengths), local.shape[1], dtype=local.dtype, device=device)
        padded[:local.shape[0]] = local
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded, group=group)
        return torch.cat([rows[:n] for rows, n in zip(gathered, lengths, strict=True)])
