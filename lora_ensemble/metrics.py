"""Classification and uncertainty metrics for ensembles (``N`` members, ``B`` samples, ``C`` classes).

Whole-tensor functions. :class:`lora_ensemble.evaluation.EnsembleMetrics` accumulates the same metrics
over batches and processes; :func:`lora_ensemble.plotting.reliability_diagram` draws them.

**Inputs.** The calibration metrics take probabilities ``probs [B, C]`` (values in ``[0, 1]``, each
row summing to 1 within ``max(C * eps, 1e-4)`` for the dtype's ``eps``: logits and unnormalised scores
such as sigmoid outputs are refused) and class indices ``targets [B]``. :func:`ensemble_probs` turns member logits
``[N, B, C]`` into the ensemble's probabilities under one of two conventions:

* ``"mean_probs"`` (this package's default, and torch-uncertainty's): the mean of the member
  softmaxes, ``mean_n softmax(l_n)``.
* ``"mean_logits"``: the softmax of the mean member logits, ``softmax(mean_n l_n)``. The paper's code
  (prs-eth/LoRA-Ensemble, ``train_evaluate.py``) computes its accuracy and ECE this way, with 10 bins,
  while its NLL and Brier score use the mean of the member probabilities.

**Metrics.** Accuracy; NLL ``mean -log p[target]``, each probability floored at the smallest normal
number of the dtype it is given in (``torch.finfo(dtype).tiny``: a zero probability costs 87.3 nats in
fp32, 708.4 in float64); Brier ``mean sum_c (p_c - onehot_c)^2``; ECE of the top-label confidence over
``n_bins`` equal-width bins ``(i/n, (i+1)/n]`` (each edge the value of the probabilities' dtype nearest
``i/n``, so a confidence of exactly ``i/n``, e.g. the mean of ``N`` one-hot members, is in bin ``i - 1``),
``sum_bins (count / B) |accuracy - confidence|`` (default 15 bins, as torchmetrics' ``MulticlassCalibrationError``; the
paper used 10). Ensemble uncertainty from ``member_probs [N, B, C]``: per-class variance across
members (1/N, the paper's Eq. 4), predictive entropy ``H[mean_n p_n]``, expected entropy
``mean_n H[p_n]``, mutual information (predictive minus expected, clamped at 0), and disagreement
(the fraction of member pairs whose top classes differ). Entropies are in nats. For generated text,
:func:`token_uncertainty` gives LM-Polygraph's five measures of a next-token distribution from member
log-probabilities (entropy of the mean, expected entropy, mutual information, reverse mutual
information, expected pairwise KL).

**Selective prediction and OOD** from any per-sample uncertainty score (higher = less certain:
predictive entropy, mutual information, ``1 - confidence``): risk-coverage curve and AURC, AUROC of
the score for detecting errors, and for telling out-of-distribution inputs from in-distribution ones.

**NaN and Inf.** A sample whose probabilities are not all finite (from logits with NaN or +Inf, or
with no finite entry) makes every aggregate metric raise a ``ValueError`` that counts such samples;
``nonfinite="skip"`` leaves them out instead. ``-Inf`` in some entries of a logit row (a masked class)
is fine: its probability is 0. Per-sample functions (entropies, variance, disagreement) propagate NaN
to that sample's output.

Scalars are returned as 0-dim float64 tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "Convention",
    "NonFinite",
    "ReliabilityBins",
    "RiskCoverage",
    "accuracy",
    "apply_temperature",
    "aurc",
    "auroc",
    "brier_score",
    "disagreement",
    "ensemble_probs",
    "entropy",
    "error_auroc",
    "expected_calibration_error",
    "expected_entropy",
    "fit_temperature",
    "member_variance",
    "mutual_information",
    "negative_log_likelihood",
    "ood_auroc",
    "reliability_bins",
    "risk_coverage",
    "token_uncertainty",
]

NonFinite = Literal["raise", "skip"]
Convention = Literal["mean_probs", "mean_logits"]
_NONFINITE_CHOICES: tuple[str, ...] = ("raise", "skip")
_CONVENTIONS: tuple[str, ...] = ("mean_probs", "mean_logits")
_FROM_LOGITS = "probabilities (from logits with NaN or +Inf, or no finite logit)"


# --- validation ------------------------------------------------------------------------------------


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_n_bins(n_bins: object) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")


def _check_floating(name: str, tensor: Tensor) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")


def _check_targets(targets: Tensor, num_classes: int, name: str, shape: tuple[int, ...]) -> None:
    """``targets [B]``: integer class indices in ``[0, C)``, for ``name`` of shape ``shape`` (``[..., B, C]``)."""
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a Tensor of class indices, got {type(targets).__name__}")
    batch = shape[-2]
    if targets.shape != (batch,):
        raise ValueError(f"targets shape {tuple(targets.shape)} must be [B] = ({batch},) ({name} shape {shape})")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer class indices, got dtype {targets.dtype}")
    if batch:
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"targets must be class indices in [0, {num_classes}) for {name} of shape {shape}, "
                             f"got values from {low} to {high}")


def _finite_samples(values: Tensor, sample_dim: int) -> Tensor:
    """``[B]`` bool: True where every value of sample ``b`` (along ``sample_dim``) is finite."""
    ok = torch.isfinite(values)
    return ok.movedim(sample_dim, 0).flatten(1).all(dim=1)


def _select_finite(ok: Tensor, nonfinite: NonFinite, name: str, what: str) -> Tensor | None:
    """Apply the NaN/Inf rule to the per-sample mask ``ok [B]``.

    Returns None when every sample is finite, else (``nonfinite="skip"``) the mask of samples to
    keep; ``nonfinite="raise"`` raises a ``ValueError`` that counts the others.
    """
    _check_choice("nonfinite", nonfinite, _NONFINITE_CHOICES)
    bad = ~ok
    count = int(bad.sum())
    if count == 0:
        return None
    if nonfinite == "raise":
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}: {count} of {ok.numel()} samples have NaN or Inf {what}; the first is sample "
                         f"{first}. Pass nonfinite='skip' to leave them out")
    return ok


def _check_member_probs(member_probs: Tensor) -> None:
    """``member_probs`` is a floating ``[N, B, C]`` tensor (a ``[B, C]`` one has lost its member dim)."""
    _check_floating("member_probs", member_probs)
    if member_probs.dim() != 3:
        raise ValueError(f"member_probs must be [N, B, C] (members, samples, classes), got shape "
                         f"{tuple(member_probs.shape)}; for one prediction [B, C] use entropy(probs)")


def _check_rows_sum_to_one(probs: Tensor, dtype: torch.dtype) -> None:
    """Every row of ``probs [B, C]`` (finite, float64, given in ``dtype``) sums to 1 within
    ``max(C * eps, 1e-4)``: ``C`` roundings in ``dtype``, and no tighter than 1e-4 so that probabilities
    computed in a lower precision and cast up pass."""
    classes = probs.shape[1]
    tol = max(classes * torch.finfo(dtype).eps, 1e-4)
    off = (probs.sum(dim=1) - 1).abs()
    worst = int(off.argmax())
    if off[worst] > tol:
        raise ValueError(f"probs rows must sum to 1 (within {tol:.2g} for {dtype} over C={classes} classes); "
                         f"{int((off > tol).sum())} of {probs.shape[0]} rows do not, e.g. row {worst} sums to "
                         f"{float(probs[worst].sum()):.6g}. For logits or unnormalised scores (sigmoid outputs) use "
                         "ensemble_probs(logits) or scores.softmax(-1)")


def _prepare(probs: Tensor, targets: Tensor, nonfinite: NonFinite) -> tuple[Tensor, Tensor]:
    """Validate ``probs [B, C]`` and ``targets [B]``, apply the NaN/Inf rule; float64 probs, int64 targets."""
    _check_floating("probs", probs)
    if probs.dim() != 2:
        raise ValueError(f"probs must be [B, C], got shape {tuple(probs.shape)}")
    _check_targets(targets, probs.shape[1], "probs", tuple(probs.shape))
    keep = _select_finite(_finite_samples(probs, 0), nonfinite, "probs", "probabilities")
    if keep is not None:
        probs, targets = probs[keep], targets[keep]
    if probs.shape[0] == 0:
        left = "" if keep is None else f" left after skipping {int((~keep).sum())} with NaN or Inf"
        raise ValueError(f"nothing to evaluate: probs has no samples{left} (shape {tuple(probs.shape)})")
    low, high = float(probs.min()), float(probs.max())
    if low < 0 or high > 1 + 1e-6:
        raise ValueError(f"probs must be probabilities in [0, 1], got values from {low:.4g} to {high:.4g}; "
                         "for logits use ensemble_probs(logits) or logits.softmax(-1)")
    dtype, probs = probs.dtype, probs.double()
    _check_rows_sum_to_one(probs, dtype)
    return probs, targets.long()


# --- per-sample terms, shared with the streaming metrics --------------------------------------------


def _confidence_and_correct(probs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Top-label confidence ``[B]`` and whether the top class is the target ``[B]`` (bool)."""
    confidence, predicted = probs.max(dim=-1)
    return confidence, predicted == targets


def _nll_terms(probs: Tensor, targets: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``-log p[target]`` per sample ``[B]``, probabilities floored at the smallest normal of ``dtype``, the
    dtype the probabilities were given in (``probs`` may be a float64 copy; None: ``probs.dtype``)."""
    p = probs.gather(1, targets.unsqueeze(1)).squeeze(1)
    return -p.clamp_min(torch.finfo(dtype or probs.dtype).tiny).log()


def _brier_terms(probs: Tensor, targets: Tensor) -> Tensor:
    """``sum_c (p_c - onehot(target)_c)^2`` per sample ``[B]``."""
    onehot = torch.nn.functional.one_hot(targets, probs.shape[1]).to(probs.dtype)
    return (probs - onehot).pow(2).sum(dim=1)


def _bin_edges(n_bins: int, dtype: torch.dtype = torch.float64, device: torch.device | None = None) -> Tensor:
    """``[n_bins + 1]`` edges ``i / n_bins``, each the ``dtype`` value nearest ``i/n`` (the division of two
    exact integers, rounded once as the mean of ``N`` one-hot members is; ``torch.linspace``'s values are
    not the nearest for some ``i`` and ``n``)."""
    return torch.arange(n_bins + 1, dtype=dtype, device=device) / n_bins


def _bin_sums(confidence: Tensor, correct: Tensor, n_bins: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``[3, n_bins]`` float64: sample count, confidence sum and correct count in each bin ``(i/n, (i+1)/n]``,
    for confidences given in ``dtype`` (compared with edges in that dtype)."""
    edges = _bin_edges(n_bins, dtype, confidence.device)
    index = torch.bucketize(confidence.to(dtype), edges[1:-1])  # x in (edges[i], edges[i+1]] -> i
    confidence = confidence.double()
    sums = torch.zeros(3, n_bins, dtype=torch.float64, device=confidence.device)
    sums[0].index_add_(0, index, torch.ones_like(confidence))
    sums[1].index_add_(0, index, confidence)
    sums[2].index_add_(0, index, correct.double())
    return sums


# --- calibration -----------------------------------------------------------------------------------


def accuracy(probs: Tensor, targets: Tensor, *, nonfinite: NonFinite = "raise") -> Tensor:
    """Fraction of samples whose most probable class is the target. ``probs [B, C]``, ``targets [B]``."""
    probs, targets = _prepare(probs, targets, nonfinite)
    return _confidence_and_correct(probs, targets)[1].double().mean()


@dataclass
class ReliabilityBins:
    """Per-bin statistics of the top-label confidence (``n_bins`` equal-width bins ``(i/n, (i+1)/n]``).

    Attributes:
        edges: ``[n_bins + 1]`` bin edges ``0, 1/n, ..., 1`` (float64, each the double nearest ``i/n``).
        confidence: ``[n_bins]`` mean confidence in each bin (0 where empty).
        accuracy: ``[n_bins]`` accuracy in each bin (0 where empty).
        count: ``[n_bins]`` samples in each bin.
    """

    edges: Tensor
    confidence: Tensor
    accuracy: Tensor
    count: Tensor

    @classmethod
    def from_sums(cls, sums: Tensor) -> ReliabilityBins:
        """From ``[3, n_bins]`` sums: count, confidence sum, correct count (see :func:`reliability_bins`)."""
        count, conf_sum, correct_sum = sums.double()
        edges = _bin_edges(sums.shape[1], device=sums.device)
        denom = count.clamp_min(1)
        return cls(edges=edges, confidence=conf_sum / denom, accuracy=correct_sum / denom, count=count)

    @property
    def n_bins(self) -> int:
        return self.count.numel()

    def ece(self) -> Tensor:
        """Expected calibration error, ``sum_bins (count / total) |accuracy - confidence|``."""
        return ((self.count / self.count.sum()) * (self.accuracy - self.confidence).abs()).sum()


def reliability_bins(probs: Tensor, targets: Tensor, n_bins: int = 15, *,
                     nonfinite: NonFinite = "raise") -> ReliabilityBins:
    """Bin samples by top-label confidence into ``(i/n, (i+1)/n]`` and average within bins.

    Args:
        probs: ``[B, C]`` probabilities (for an ensemble, :func:`ensemble_probs`).
        targets: ``[B]`` class indices.
        n_bins: equal-width bins on ``(0, 1]``; 15 by default (torchmetrics' default), the paper used 10.
        nonfinite: ``"raise"`` on samples with NaN or Inf, or ``"skip"`` them.
    """
    _check_n_bins(n_bins)
    _check_floating("probs", probs)
    dtype = probs.dtype
    probs, targets = _prepare(probs, targets, nonfinite)
    return ReliabilityBins.from_sums(_bin_sums(*_confidence_and_correct(probs, targets), n_bins, dtype))


def expected_calibration_error(probs: Tensor, targets: Tensor, n_bins: int = 15, *,
                               nonfinite: NonFinite = "raise") -> Tensor:
    """ECE of ``probs [B, C]``: ``sum_bins (count / B) |accuracy - confidence|`` over ``n_bins``
    equal-width bins (15 by default; the paper used 10). Which ensemble probabilities are binned is the
    caller's choice: ``ensemble_probs(logits)`` (mean of member probabilities, this package's default)
    or ``ensemble_probs(logits, "mean_logits")`` (the paper's code)."""
    return reliability_bins(probs, targets, n_bins, nonfinite=nonfinite).ece()


def negative_log_likelihood(probs: Tensor, targets: Tensor, *, nonfinite: NonFinite = "raise") -> Tensor:
    """Mean ``-log p[target]`` of ``probs [B, C]``, each probability floored at the smallest normal
    number of ``probs``' dtype (``torch.finfo(probs.dtype).tiny``), so never inf: a zero probability
    costs 87.3 nats in fp32 and bf16, 708.4 in float64, 9.7 in fp16. The paper's code takes the plain
    log."""
    _check_floating("probs", probs)
    dtype = probs.dtype
    probs, targets = _prepare(probs, targets, nonfinite)
    return _nll_terms(probs, targets, dtype).mean()


def brier_score(probs: Tensor, targets: Tensor, *, nonfinite: NonFinite = "raise") -> Tensor:
    """Mean over samples of ``sum_c (p_c - onehot(target)_c)^2`` (between 0 and 2). ``probs [B, C]``."""
    probs, targets = _prepare(probs, targets, nonfinite)
    return _brier_terms(probs, targets).mean()


# --- ensemble predictions and uncertainty ----------------------------------------------------------


def ensemble_probs(member_logits: Tensor, convention: Convention = "mean_probs") -> Tensor:
    """The ensemble's probabilities ``[B, C]`` (float64) from member logits ``[N, B, C]``.

    Args:
        member_logits: ``[N, B, C]``; ``[B, C]`` for one model (both conventions are its softmax).
        convention: ``"mean_probs"`` (default): ``mean_n softmax(l_n)``, what this package's metrics,
            :meth:`LoRAEnsemble.predict` and torch-uncertainty use. ``"mean_logits"``:
            ``softmax(mean_n l_n)``, what the paper's code bins for its ECE and accuracy.
    """
    _check_floating("member_logits", member_logits)
    _check_choice("convention", convention, _CONVENTIONS)
    if member_logits.dim() not in (2, 3):
        raise ValueError(f"member_logits must be [N, B, C] or [B, C], got shape {tuple(member_logits.shape)}")
    logits = member_logits.double()
    if logits.dim() == 2:
        return logits.softmax(dim=-1)
    if convention == "mean_logits":
        return logits.mean(dim=0).softmax(dim=-1)
    return logits.softmax(dim=-1).mean(dim=0)


def entropy(probs: Tensor) -> Tensor:
    """``-sum_c p_c log p_c`` over the last dim (``0 log 0 = 0``). ``[..., C] -> [...]``."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def expected_entropy(member_probs: Tensor) -> Tensor:
    """Mean of the members' entropies: ``[N, B, C] -> [B]`` (aleatoric uncertainty)."""
    _check_member_probs(member_probs)
    return entropy(member_probs).mean(dim=0)


def mutual_information(member_probs: Tensor) -> Tensor:
    """``H[mean_n p_n] - mean_n H[p_n]``, clamped at 0: ``[N, B, C] -> [B]`` (epistemic uncertainty)."""
    _check_member_probs(member_probs)
    return (entropy(member_probs.mean(dim=0)) - expected_entropy(member_probs)).clamp_min(0)


def token_uncertainty(member_log_probs: Tensor) -> dict[str, Tensor]:
    """LM-Polygraph's ensemble measures of one next-token distribution per position, from the members'
    log-probabilities ``[N, ..., V] -> [...]`` each (nats, in ``member_log_probs``' dtype).

    With ``p_n`` the members' distributions and ``p = mean_n p_n`` (Malinin & Gales, "Uncertainty
    estimation in autoregressive structured prediction", ICLR 2021; the token-level ``pe`` measures of
    LM-Polygraph, ``lm_polygraph/utils/ensemble_utils/ensemble_greedy.py``):

    * ``entropy_of_mean``: ``H[p]`` (total uncertainty; LM-Polygraph's ``total_uncertainty``),
    * ``expected_entropy``: ``mean_n H[p_n]`` (data uncertainty; ``data_uncertainty``),
    * ``mutual_information``: ``H[p] - mean_n H[p_n]`` (knowledge uncertainty; ``mutual_information``),
    * ``expected_pairwise_kl``: ``mean_{n,m} KL(p_n || p_m) = -sum_v p(v) mean_n log p_n(v) - mean_n H[p_n]``
      (``epkl``),
    * ``reverse_mutual_information``: ``mean_n KL(p || p_n) = -sum_v p(v) mean_n log p_n(v) - H[p]``
      (``rmi``),

    so ``expected_pairwise_kl = mutual_information + reverse_mutual_information``. Nothing is clamped: a
    value below 0 is rounding. A token that some member gives probability 0 (``-inf``) while the mean
    does not makes the two KL measures ``+inf``, as the divergences are.
    """
    _check_floating("member_log_probs", member_log_probs)
    if member_log_probs.dim() < 2:
        raise ValueError(f"member_log_probs must be [N, ..., V], got shape {tuple(member_log_probs.shape)}")
    members = member_log_probs.shape[0]
    log_mean = member_log_probs.logsumexp(dim=0) - math.log(members)
    mean = log_mean.exp()
    entropy_of_mean = -torch.where(mean > 0, mean * log_mean, 0).sum(dim=-1)
    member_probs = member_log_probs.exp()
    expected = -torch.where(member_probs > 0, member_probs * member_log_probs, 0).sum(dim=-1).mean(dim=0)
    cross_entropy = -torch.where(mean > 0, mean * member_log_probs.mean(dim=0), 0).sum(dim=-1)
    return {
        "entropy_of_mean": entropy_of_mean,
        "expected_entropy": expected,
        "mutual_information": entropy_of_mean - expected,
        "reverse_mutual_information": cross_entropy - entropy_of_mean,
        "expected_pairwise_kl": cross_entropy - expected,
    }


def member_variance(member_probs: Tensor) -> Tensor:
    """Per-class variance of the member probabilities, ``1/N sum_n (p_n - mean)^2``: ``[N, B, C] -> [B, C]``."""
    _check_member_probs(member_probs)
    return member_probs.var(dim=0, correction=0)


def disagreement(member_probs: Tensor) -> Tensor:
    """Fraction of member pairs whose most probable classes differ: ``[N, B, C] -> [B]`` (float64).

    ``1 - sum_c k_c (k_c - 1) / (N (N - 1))`` with ``k_c`` the members whose top class is ``c``: the
    paper's pairwise disagreement and torch-uncertainty's ``Disagreement``, per sample. Needs ``N >= 2``;
    member logits give the same result. A sample with NaN or Inf in any member gets NaN.
    """
    _check_member_probs(member_probs)
    members = member_probs.shape[0]
    if members < 2:
        raise ValueError(f"disagreement needs at least 2 members, got member_probs of shape "
                         f"{tuple(member_probs.shape)}")
    votes = torch.nn.functional.one_hot(member_probs.argmax(dim=-1), member_probs.shape[-1]).sum(dim=0)
    agreeing_pairs = (votes * (votes - 1)).sum(dim=-1).double()
    value = 1 - agreeing_pairs / (members * (members - 1))
    return value.masked_fill(~_finite_samples(member_probs, 1), float("nan"))


# --- temperature scaling ---------------------------------------------------------------------------


def apply_temperature(logits: Tensor, temperature: float | Tensor) -> Tensor:
    """``softmax(logits / T)``; for member logits ``[N, B, C]`` the mean of the member softmaxes
    (``"mean_probs"``) -> ``[B, C]`` float64. ``-Inf`` logits (masked classes) stay ``-Inf``."""
    masked = logits == float("-inf")
    scaled = (logits.masked_fill(masked, 0) / temperature).masked_fill(masked, float("-inf"))
    return ensemble_probs(scaled) if logits.dim() == 3 else scaled.softmax(dim=-1)


def fit_temperature(logits: Tensor, targets: Tensor, max_iter: int = 100, *,
                    nonfinite: NonFinite = "raise") -> float:
    """The temperature ``T`` minimising the NLL of ``apply_temperature(logits, T)`` on held-out data.

    Args:
        logits: ``[B, C]``, or member logits ``[N, B, C]`` (one ``T`` shared by every member,
            applied before averaging the member softmaxes).
        targets: ``[B]`` class indices.
        max_iter: L-BFGS iterations on ``log T``.
        nonfinite: samples whose softmax is not finite in some member (NaN or +Inf logits, or no
            finite logit): ``"raise"`` a ``ValueError`` that counts them, or ``"skip"`` them.
    """
    _check_floating("logits", logits)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [B, C] or [N, B, C], got shape {tuple(logits.shape)}")
    _check_targets(targets, logits.shape[-1], "logits", tuple(logits.shape))
    logits, targets = logits.detach().double(), targets.long()
    sample_dim = logits.dim() - 2
    keep = _select_finite(_finite_samples(logits.softmax(dim=-1), sample_dim), nonfinite, "logits",
                          _FROM_LOGITS)
    if keep is not None:
        logits, targets = logits[(slice(None),) * sample_dim + (keep,)], targets[keep]
    if targets.numel() == 0:
        raise ValueError(f"nothing to fit: logits has no samples with finite probabilities (shape "
                         f"{tuple(logits.shape)})")
    log_t = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = _nll_terms(apply_temperature(logits, log_t.exp()), targets).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


# --- selective prediction and OOD detection ---------------------------------------------------------


def _prepare_scores(scores: Tensor, nonfinite: NonFinite, name: str, labels: Tensor | None = None,
                    labels_name: str = "") -> tuple[Tensor, Tensor | None]:
    """Validate ``scores [B]`` (and boolean ``labels [B]``), apply the NaN/Inf rule; float64 scores."""
    _check_floating(name, scores)
    if scores.dim() != 1:
        raise ValueError(f"{name} must be [B], one score per sample, got shape {tuple(scores.shape)}")
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dtype != torch.bool:
            got = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
            raise TypeError(f"{labels_name} must be a bool tensor, got {got}")
        if labels.shape != scores.shape:
            raise ValueError(f"{labels_name} shape {tuple(labels.shape)} must equal {name} shape "
                             f"{tuple(scores.shape)}")
    keep = _select_finite(torch.isfinite(scores), nonfinite, name, "values")
    if keep is not None:
        scores, labels = scores[keep], None if labels is None else labels[keep]
    if scores.numel() == 0:
        left = "" if keep is None else f" left after skipping {int((~keep).sum())} NaN or Inf"
        raise ValueError(f"nothing to evaluate: {name} has no samples{left}")
    return scores.double(), labels


def _tie_groups(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sort ``scores [B]`` ascending and group equal values: the group of each sorted sample ``[B]``,
    and per group ``[G]`` its size, its start offset and how many of its samples have ``labels`` True."""
    sorted_scores, order = scores.sort()
    _, group, sizes = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    hits = torch.zeros(sizes.numel(), dtype=torch.float64, device=scores.device)
    hits.index_add_(0, group, labels[order].double())
    return group, sizes, sizes.cumsum(0) - sizes, hits


def _auroc(scores: Tensor, positive: Tensor) -> Tensor:
    num_pos = int(positive.sum())
    num_neg = positive.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(f"AUROC needs positive and negative samples, got {num_pos} positive and {num_neg} "
                         "negative")
    _, sizes, starts, pos_per_group = _tie_groups(scores, positive)
    mean_rank = starts + (sizes + 1) / 2  # 1-based ranks, averaged over ties
    return ((pos_per_group * mean_rank).sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


def auroc(scores: Tensor, positive: Tensor, *, nonfinite: NonFinite = "raise") -> Tensor:
    """Area under the ROC curve of ``scores [B]`` for telling ``positive [B]`` (bool) samples apart.

    The probability that a random positive scores higher than a random negative, ties counting one
    half (the Mann-Whitney U statistic; equals ``sklearn.metrics.roc_auc_score``). Needs at least one
    positive and one negative sample.
    """
    return _auroc(*_prepare_scores(scores, nonfinite, "scores", positive, "positive"))


def error_auroc(uncertainty: Tensor, correct: Tensor, *, nonfinite: NonFinite = "raise") -> Tensor:
    """AUROC of ``uncertainty [B]`` for detecting wrong predictions (``correct [B]``, bool, False):
    1 when every error is more uncertain than every correct prediction, 0.5 for a useless score."""
    uncertainty, correct = _prepare_scores(uncertainty, nonfinite, "uncertainty", correct, "correct")
    return _auroc(uncertainty, ~correct)


def ood_auroc(uncertainty_in: Tensor, uncertainty_out: Tensor, *, nonfinite: NonFinite = "raise") -> Tensor:
    """AUROC of an uncertainty score for telling out-of-distribution inputs (``uncertainty_out [B_out]``)
    from in-distribution ones (``uncertainty_in [B_in]``), OOD being the positive class. The paper's
    AUROC (max probability as the score, in-distribution positive) equals
    ``ood_auroc(-confidence_in, -confidence_out)``."""
    scores_in = _prepare_scores(uncertainty_in, nonfinite, "uncertainty_in")[0]
    scores_out = _prepare_scores(uncertainty_out, nonfinite, "uncertainty_out")[0]
    is_out = torch.cat([torch.zeros_like(scores_in, dtype=torch.bool), torch.ones_like(scores_out, dtype=torch.bool)])
    return _auroc(torch.cat([scores_in, scores_out]), is_out)


@dataclass
class RiskCoverage:
    """The risk-coverage curve of a selective classifier that answers when ``uncertainty <= threshold``.

    One point per distinct uncertainty value, from the most certain to all samples (ascending).

    Attributes:
        threshold: ``[K]`` the distinct uncertainty values.
        coverage: ``[K]`` fraction of samples answered.
        risk: ``[K]`` error rate among the answered samples.
    """

    threshold: Tensor
    coverage: Tensor
    risk: Tensor


def risk_coverage(uncertainty: Tensor, correct: Tensor, *, nonfinite: NonFinite = "raise") -> RiskCoverage:
    """Risk-coverage curve of ``uncertainty [B]`` (higher = less certain) against ``correct [B]`` (bool)."""
    uncertainty, correct = _prepare_scores(uncertainty, nonfinite, "uncertainty", correct, "correct")
    _, sizes, _, errors = _tie_groups(uncertainty, ~correct)
    answered = sizes.cumsum(0).double()
    return RiskCoverage(threshold=torch.unique(uncertainty), coverage=answered / uncertainty.numel(),
                        risk=errors.cumsum(0) / answered)


def aurc(uncertainty: Tensor, correct: Tensor, *, nonfinite: NonFinite = "raise") -> Tensor:
    """Area under the risk-coverage curve: the mean over ``k = 1..B`` of the error rate among the ``k``
    least uncertain samples (Geifman et al., 2019; lower is better, ``1 - accuracy`` for a useless score).

    Samples with equal uncertainty enter in random order, and the result is the exact expectation
    over those orders, so it does not depend on how the samples were ordered or split across batches.
    ``uncertainty [B]`` higher = less certain, ``correct [B]`` bool.
    """
    uncertainty, correct = _prepare_scores(uncertainty, nonfinite, "uncertainty", correct, "correct")
    group, sizes, starts, errors = _tie_groups(uncertainty, ~correct)
    errors_before = errors.cumsum(0) - errors
    k = torch.arange(1, uncertainty.numel() + 1, dtype=torch.float64, device=uncertainty.device)
    # within a tie group, each of its samples is an error with probability errors / size
    expected_errors = errors_before[group] + (k - starts[group]) * (errors / sizes)[group]
    return (expected_errors / k).mean()
