"""Classification and uncertainty metrics for ensembles (``N`` members, ``B`` samples, ``C`` classes).

Every metric takes probabilities, never logits: for an ensemble, the mean of the member softmaxes
(``probs [B, C]``), as the paper and torch-uncertainty do. ``targets [B]`` holds class indices.
Entropies are in nats. Scalars are returned as 0-dim float tensors.

* accuracy, NLL ``mean -log p[target]``, Brier ``mean sum_c (p_c - onehot_c)^2``.
* ECE: top-label confidence, ``n_bins`` equal-width bins ``(i/n, (i+1)/n]`` (default 15, as
  torchmetrics' ``MulticlassCalibrationError``), ``sum_bins (count / B) |accuracy - confidence|``.
* ensemble uncertainty from ``member_probs [N, B, C]``: per-class variance across members (1/N,
  the paper's Eq. 4), predictive entropy ``H[mean_n p_n]``, expected entropy ``mean_n H[p_n]``,
  mutual information = predictive - expected (clamped at 0).
* temperature scaling: one ``T > 0`` fitted by minimising the NLL of held-out data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ReliabilityBins",
    "accuracy",
    "apply_temperature",
    "brier_score",
    "entropy",
    "expected_calibration_error",
    "expected_entropy",
    "fit_temperature",
    "member_variance",
    "mutual_information",
    "negative_log_likelihood",
    "reliability_bins",
]


def _check(probs: Tensor, targets: Tensor) -> None:
    if probs.dim() != 2:
        raise ValueError(f"probs must be [B, C], got shape {tuple(probs.shape)}")
    if targets.shape != probs.shape[:1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must be [B] = ({probs.shape[0]},) "
                         f"(probs shape {tuple(probs.shape)})")


def accuracy(probs: Tensor, targets: Tensor) -> Tensor:
    """Fraction of samples whose most probable class is the target. ``probs [B, C]``."""
    _check(probs, targets)
    return (probs.argmax(dim=-1) == targets).double().mean()


@dataclass
class ReliabilityBins:
    """Per-bin statistics of the top-label confidence (``n_bins`` equal-width bins on ``(0, 1]``).

    Attributes:
        edges: ``[n_bins + 1]`` bin edges ``0, 1/n, ..., 1``.
        confidence: ``[n_bins]`` mean confidence in each bin (0 where empty).
        accuracy: ``[n_bins]`` accuracy in each bin (0 where empty).
        count: ``[n_bins]`` samples in each bin.
    """

    edges: Tensor
    confidence: Tensor
    accuracy: Tensor
    count: Tensor


def reliability_bins(probs: Tensor, targets: Tensor, n_bins: int = 15) -> ReliabilityBins:
    """Bin samples by top-label confidence into ``(i/n, (i+1)/n]`` and average within bins."""
    _check(probs, targets)
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    confidence, predicted = probs.double().max(dim=-1)
    correct = (predicted == targets).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=probs.device)
    index = torch.bucketize(confidence, edges[1:-1])  # x in (edges[i], edges[i+1]] -> i
    count = torch.zeros(n_bins, dtype=torch.float64, device=probs.device)
    count.index_add_(0, index, torch.ones_like(confidence))
    conf_sum = torch.zeros_like(count).index_add_(0, index, confidence)
    acc_sum = torch.zeros_like(count).index_add_(0, index, correct)
    denom = count.clamp_min(1)
    return ReliabilityBins(edges=edges, confidence=conf_sum / denom, accuracy=acc_sum / denom, count=count)


def expected_calibration_error(probs: Tensor, targets: Tensor, n_bins: int = 15) -> Tensor:
    """ECE: ``sum_bins (count / B) * |accuracy - confidence|`` over ``n_bins`` equal-width bins."""
    bins = reliability_bins(probs, targets, n_bins)
    return ((bins.count / bins.count.sum()) * (bins.accuracy - bins.confidence).abs()).sum()


def negative_log_likelihood(probs: Tensor, targets: Tensor) -> Tensor:
    """Mean ``-log p[target]`` (probabilities floored at the dtype's tiniest normal, so never inf)."""
    _check(probs, targets)
    p = probs.double().gather(1, targets.long().unsqueeze(1)).squeeze(1)
    return -p.clamp_min(torch.finfo(probs.dtype).tiny).log().mean()


def brier_score(probs: Tensor, targets: Tensor) -> Tensor:
    """Mean over samples of ``sum_c (p_c - onehot(target)_c)^2`` (between 0 and 2)."""
    _check(probs, targets)
    onehot = torch.nn.functional.one_hot(targets.long(), probs.shape[1]).double()
    return (probs.double() - onehot).pow(2).sum(dim=1).mean()


def entropy(probs: Tensor) -> Tensor:
    """``-sum_c p_c log p_c`` over the last dim (``0 log 0 = 0``). ``[..., C] -> [...]``."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def expected_entropy(member_probs: Tensor) -> Tensor:
    """Mean of the members' entropies: ``[N, B, C] -> [B]`` (aleatoric uncertainty)."""
    return entropy(member_probs).mean(dim=0)


def mutual_information(member_probs: Tensor) -> Tensor:
    """``H[mean_n p_n] - mean_n H[p_n]``, clamped at 0: ``[N, B, C] -> [B]`` (epistemic uncertainty)."""
    return (entropy(member_probs.mean(dim=0)) - expected_entropy(member_probs)).clamp_min(0)


def member_variance(member_probs: Tensor) -> Tensor:
    """Per-class variance of the member probabilities, ``1/N sum_n (p_n - mean)^2``: ``[N, B, C] -> [B, C]``."""
    return member_probs.var(dim=0, correction=0)


def apply_temperature(logits: Tensor, temperature: float | Tensor) -> Tensor:
    """``softmax(logits / T)``; for member logits ``[N, B, C]`` the member softmaxes are averaged -> ``[B, C]``."""
    probs = (logits / temperature).softmax(dim=-1)
    return probs.mean(dim=0) if logits.dim() == 3 else probs


def fit_temperature(logits: Tensor, targets: Tensor, max_iter: int = 100) -> float:
    """The temperature ``T`` minimising the NLL of ``apply_temperature(logits, T)`` on held-out data.

    Args:
        logits: ``[B, C]``, or member logits ``[N, B, C]`` (one ``T`` shared by every member,
            applied before averaging the member softmaxes).
        targets: ``[B]`` class indices.
        max_iter: L-BFGS iterations on ``log T``.
    """
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [B, C] or [N, B, C], got shape {tuple(logits.shape)}")
    logits = logits.detach().double()
    _check(logits[0] if logits.dim() == 3 else logits, targets)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = negative_log_likelihood(apply_temperature(logits, log_t.exp()), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())
