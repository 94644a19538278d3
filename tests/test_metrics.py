"""Metrics against values worked out by hand, and temperature scaling on data with a known temperature."""

from __future__ import annotations

import math

import pytest
import torch

from lora_ensemble import metrics

PROBS = torch.tensor([[0.70, 0.20, 0.10],
                      [0.10, 0.50, 0.40],
                      [0.30, 0.30, 0.40],
                      [0.25, 0.25, 0.50]], dtype=torch.float64)
TARGETS = torch.tensor([0, 2, 2, 1])


def test_accuracy() -> None:
    # argmax = [0, 1, 2, 2] -> correct [1, 0, 1, 0]
    assert metrics.accuracy(PROBS, TARGETS).item() == 0.5


def test_nll() -> None:
    want = -(math.log(0.7) + math.log(0.4) + math.log(0.4) + math.log(0.25)) / 4
    assert metrics.negative_log_likelihood(PROBS, TARGETS).item() == pytest.approx(want, abs=1e-12)


def test_nll_of_a_zero_probability_is_finite() -> None:
    probs = torch.tensor([[1.0, 0.0]])
    assert math.isfinite(metrics.negative_log_likelihood(probs, torch.tensor([1])).item())


def test_brier() -> None:
    # per sample: 0.09+0.04+0.01, 0.01+0.25+0.36, 0.09+0.09+0.36, 0.0625+0.5625+0.25
    assert metrics.brier_score(PROBS, TARGETS).item() == pytest.approx((0.14 + 0.62 + 0.54 + 0.875) / 4, abs=1e-12)


def test_ece_three_bins() -> None:
    # torchmetrics' documented example: confidences 0.55 0.55 0.60 0.90, correct 0 0 1 1.
    # bin (1/3, 2/3]: acc 1/3, conf 0.5667, weight 3/4; bin (2/3, 1]: acc 1, conf 0.9, weight 1/4.
    probs = torch.tensor([[0.25, 0.20, 0.55], [0.55, 0.05, 0.40], [0.10, 0.30, 0.60], [0.90, 0.05, 0.05]],
                         dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 0])
    assert metrics.expected_calibration_error(probs, targets, n_bins=3).item() == pytest.approx(0.2, abs=1e-12)


def test_ece_default_fifteen_bins() -> None:
    # confidences 0.55, 0.55 (bin 8: (8/15, 9/15]), 0.62 (bin 9), 0.90 (bin 13); correct 0, 0, 1, 1
    probs = torch.tensor([[0.55, 0.45], [0.45, 0.55], [0.62, 0.38], [0.10, 0.90]], dtype=torch.float64)
    targets = torch.tensor([1, 0, 0, 1])
    want = 0.5 * 0.55 + 0.25 * (1 - 0.62) + 0.25 * (1 - 0.90)
    assert metrics.expected_calibration_error(probs, targets).item() == pytest.approx(want, abs=1e-12)
    bins = metrics.reliability_bins(probs, targets)
    assert bins.count.tolist() == [0] * 8 + [2, 1, 0, 0, 0, 1, 0]
    assert bins.accuracy[9].item() == 1.0 and bins.confidence[8].item() == pytest.approx(0.55)


def test_ece_of_a_perfectly_calibrated_bin_is_zero() -> None:
    probs = torch.tensor([[0.75, 0.25]] * 4, dtype=torch.float64)
    assert metrics.expected_calibration_error(probs, torch.tensor([0, 0, 0, 1])).item() == pytest.approx(0.0)


def test_entropies_and_mutual_information() -> None:
    assert metrics.entropy(torch.full((4,), 0.25)).item() == pytest.approx(math.log(4))
    assert metrics.entropy(torch.tensor([1.0, 0.0])).item() == 0.0
    # two confident members that disagree: all the uncertainty is epistemic
    disagree = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert metrics.mutual_information(disagree).item() == pytest.approx(math.log(2))
    assert metrics.expected_entropy(disagree).item() == 0.0
    assert metrics.member_variance(disagree).tolist() == [[0.25, 0.25]]
    # two identical uncertain members: none of it is
    agree = torch.tensor([[[0.5, 0.5]], [[0.5, 0.5]]])
    assert metrics.mutual_information(agree).item() == 0.0
    assert metrics.expected_entropy(agree).item() == pytest.approx(math.log(2))


def test_variance_is_the_population_variance() -> None:
    member_probs = torch.softmax(torch.randn(5, 3, 4, dtype=torch.float64), dim=-1)
    mean = member_probs.mean(0)
    want = ((member_probs - mean) ** 2).sum(0) / 5
    torch.testing.assert_close(metrics.member_variance(member_probs), want)


@pytest.mark.parametrize("members", [None, 2])
def test_temperature_recovers_a_known_temperature(members: int | None) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4000, 5, generator=generator, dtype=torch.float64)
    targets = torch.multinomial(torch.softmax(logits / 2.0, dim=-1), 1, generator=generator).squeeze(1)
    given = logits if members is None else logits.expand(members, *logits.shape)
    temperature = metrics.fit_temperature(given, targets)
    assert temperature == pytest.approx(2.0, rel=0.1)
    before = metrics.negative_log_likelihood(metrics.apply_temperature(given, 1.0), targets)
    after = metrics.negative_log_likelihood(metrics.apply_temperature(given, temperature), targets)
    assert after < before


def test_shape_errors_name_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"targets shape \(3,\)"):
        metrics.accuracy(PROBS, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"probs must be \[B, C\]"):
        metrics.brier_score(PROBS[None], TARGETS)
    with pytest.raises(ValueError, match="n_bins"):
        metrics.expected_calibration_error(PROBS, TARGETS, n_bins=0)
