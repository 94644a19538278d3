"""Metrics against values worked out by hand, and temperature scaling on data with a known temperature."""

from __future__ import annotations

import itertools
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


# --- against independent implementations, on fresh random data ---------------------------------------


def random_ensemble(members: int, batch: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Member logits ``[N, B, C]`` that share a signal (so accuracy is neither 0 nor 1) and targets ``[B]``."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, classes, (batch,), generator=generator)
    signal = 2.0 * torch.nn.functional.one_hot(targets, classes) + torch.randn(batch, classes, generator=generator)
    logits = signal + 1.5 * torch.randn(members, batch, classes, generator=generator, dtype=torch.float64)
    return logits, targets


SIZES = [(1, 2), (2, 2), (57, 2), (203, 10), (64, 100)]  # (B, C)


@pytest.mark.parametrize("batch,classes", SIZES)
def test_calibration_metrics_match_torchmetrics_and_sklearn(batch: int, classes: int) -> None:
    from sklearn.metrics import brier_score_loss
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error

    logits, targets = random_ensemble(3, batch, classes, seed=batch + classes)
    probs = metrics.ensemble_probs(logits)
    want_acc = multiclass_accuracy(probs, targets, num_classes=classes, average="micro")
    assert metrics.accuracy(probs, targets).item() == pytest.approx(want_acc.item(), abs=1e-6)  # float32
    for n_bins in (15, 10, 3):
        want_ece = multiclass_calibration_error(probs, targets, num_classes=classes, n_bins=n_bins)
        got_ece = metrics.expected_calibration_error(probs, targets, n_bins)
        assert got_ece.item() == pytest.approx(want_ece.item(), abs=1e-6)
    want_nll = torch.nn.functional.nll_loss(probs.log(), targets)
    assert metrics.negative_log_likelihood(probs, targets).item() == pytest.approx(want_nll.item(), abs=1e-12)
    want_brier = brier_score_loss(targets.numpy(), probs.numpy(), labels=list(range(classes)), scale_by_half=False)
    assert metrics.brier_score(probs, targets).item() == pytest.approx(want_brier, abs=1e-12)


def test_ensemble_probs_conventions() -> None:
    logits, targets = random_ensemble(4, 33, 7, seed=1)
    mean_probs = metrics.ensemble_probs(logits)
    torch.testing.assert_close(mean_probs, torch.stack([m.softmax(-1) for m in logits]).mean(0))
    torch.testing.assert_close(metrics.ensemble_probs(logits, "mean_logits"), (logits.sum(0) / 4).softmax(-1))
    torch.testing.assert_close(metrics.ensemble_probs(logits[0], "mean_logits"), logits[0].softmax(-1))
    assert not torch.allclose(mean_probs, metrics.ensemble_probs(logits, "mean_logits"))
    # apply_temperature averages member softmaxes: the default convention
    torch.testing.assert_close(metrics.apply_temperature(logits, 1.0), mean_probs)
    with pytest.raises(ValueError, match="convention must be one of"):
        metrics.ensemble_probs(logits, "paper")
    with pytest.raises(ValueError, match=r"member_logits must be \[N, B, C\] or \[B, C\], got shape \(33,\)"):
        metrics.ensemble_probs(logits[0, :, 0])


def test_papers_ece_bins_the_softmax_of_mean_logits_in_ten_bins() -> None:
    # The paper's _ECELoss, re-derived: bins (lower, upper] of width 1/10 over softmax(mean logits).
    logits, targets = random_ensemble(5, 301, 10, seed=2)
    confidence, predicted = logits.mean(0).softmax(-1).max(-1)
    correct = (predicted == targets).double()
    want = 0.0
    for lower in range(10):
        in_bin = (confidence > lower / 10) & (confidence <= (lower + 1) / 10)
        if in_bin.any():
            want += in_bin.double().mean() * (confidence[in_bin].mean() - correct[in_bin].mean()).abs()
    got = metrics.expected_calibration_error(metrics.ensemble_probs(logits, "mean_logits"), targets, n_bins=10)
    assert got.item() == pytest.approx(float(want), abs=1e-12)


@pytest.mark.parametrize("members", [2, 3, 6])
def test_disagreement_is_the_rate_of_disagreeing_member_pairs(members: int) -> None:
    logits, _ = random_ensemble(members, 41, 3, seed=members)
    top = logits.argmax(-1)
    pairs = [(i, j) for i in range(members) for j in range(i + 1, members)]
    want = torch.stack([(top[i] != top[j]).double() for i, j in pairs]).mean(0)
    probs = logits.softmax(-1)
    torch.testing.assert_close(metrics.disagreement(probs), want)
    torch.testing.assert_close(metrics.disagreement(logits), want)  # only the top class counts
    probs[1, 5, 0] = float("nan")
    got = metrics.disagreement(probs)
    others = torch.arange(41) != 5
    assert got[5].isnan()
    torch.testing.assert_close(got[others], want[others])
    with pytest.raises(ValueError, match=r"at least 2 members, got member_probs of shape \(1, 41, 3\)"):
        metrics.disagreement(probs[:1])


# --- selective prediction and OOD detection -----------------------------------------------------------


@pytest.mark.parametrize("batch,ties", [(2, False), (37, False), (200, False), (37, True), (200, True)])
def test_auroc_matches_sklearn_and_torchmetrics(batch: int, ties: bool) -> None:
    from sklearn.metrics import roc_auc_score
    from torchmetrics.functional.classification import binary_auroc

    generator = torch.Generator().manual_seed(batch)
    positive = torch.rand(batch, generator=generator) < 0.4
    positive[:2] = torch.tensor([True, False])
    scores = torch.randn(batch, generator=generator, dtype=torch.float64) + positive.double()
    if ties:
        scores = scores.round()
    want = roc_auc_score(positive.numpy(), scores.numpy())
    assert metrics.auroc(scores, positive).item() == pytest.approx(want, abs=1e-12)
    assert binary_auroc(scores.sigmoid(), positive.long()).item() == pytest.approx(want, abs=1e-6)
    # error detection: errors are the positives; OOD: out-of-distribution inputs are
    assert metrics.error_auroc(scores, ~positive).item() == pytest.approx(want, abs=1e-12)
    assert metrics.ood_auroc(scores[~positive], scores[positive]).item() == pytest.approx(want, abs=1e-12)


def test_ood_auroc_of_negated_confidence_is_the_papers_auroc() -> None:
    from sklearn.metrics import roc_auc_score

    confidence_in = torch.rand(50, dtype=torch.float64) * 0.5 + 0.5
    confidence_out = torch.rand(31, dtype=torch.float64) * 0.7 + 0.3
    # The paper: max probability as the score, in-distribution labelled 1.
    want = roc_auc_score([1] * 50 + [0] * 31, torch.cat([confidence_in, confidence_out]).numpy())
    assert metrics.ood_auroc(-confidence_in, -confidence_out).item() == pytest.approx(want, abs=1e-12)


def brute_force_aurc(uncertainty: list[float], correct: list[bool], order: list[int]) -> float:
    """Mean over k of the error rate of the k first samples of ``order`` (ascending uncertainty)."""
    errors, total = 0, 0.0
    for k, index in enumerate(order, start=1):
        errors += not correct[index]
        total += errors / k
    return total / len(order)


def test_aurc_without_ties_is_the_mean_selective_risk() -> None:
    generator = torch.Generator().manual_seed(3)
    uncertainty = torch.rand(101, generator=generator, dtype=torch.float64)
    correct = torch.rand(101, generator=generator) > uncertainty.float()  # informative score
    order = uncertainty.argsort().tolist()
    want = brute_force_aurc(uncertainty.tolist(), correct.tolist(), order)
    assert metrics.aurc(uncertainty, correct).item() == pytest.approx(want, abs=1e-12)
    assert metrics.aurc(uncertainty, correct).item() < 1 - correct.double().mean().item()


def test_aurc_with_ties_is_the_expectation_over_tie_orders() -> None:
    uncertainty = torch.tensor([0.5, 0.2, 0.2, 0.9, 0.2, 0.5, 0.1], dtype=torch.float64)
    correct = torch.tensor([False, True, False, False, True, True, True])
    orders = {tuple(sorted(range(7), key=lambda i: (uncertainty[i].item(), perm.index(i))))
              for perm in itertools.permutations(range(7))}
    want = sum(brute_force_aurc(uncertainty.tolist(), correct.tolist(), list(o)) for o in orders) / len(orders)
    assert len(orders) == 3 * 2 * 1 * 2  # 3! orders of the 0.2s, 2! of the 0.5s
    assert metrics.aurc(uncertainty, correct).item() == pytest.approx(want, abs=1e-12)
    shuffled = torch.randperm(7)
    assert metrics.aurc(uncertainty[shuffled], correct[shuffled]).item() == pytest.approx(want, abs=1e-12)
    # a constant score is useless: every coverage has the overall error rate
    assert metrics.aurc(torch.zeros(7, dtype=torch.float64), correct).item() == pytest.approx(3 / 7, abs=1e-12)


def test_risk_coverage_points_are_the_thresholded_error_rates() -> None:
    generator = torch.Generator().manual_seed(4)
    uncertainty = torch.randint(0, 9, (60,), generator=generator).double() / 8
    correct = torch.rand(60, generator=generator) > 0.3
    curve = metrics.risk_coverage(uncertainty, correct)
    assert curve.threshold.tolist() == sorted(set(uncertainty.tolist()))
    for threshold, coverage, risk in zip(curve.threshold, curve.coverage, curve.risk, strict=True):
        answered = uncertainty <= threshold
        assert coverage.item() == pytest.approx(answered.double().mean().item(), abs=1e-12)
        assert risk.item() == pytest.approx((~correct[answered]).double().mean().item(), abs=1e-12)
    assert curve.coverage[-1].item() == 1.0


# --- NaN and Inf --------------------------------------------------------------------------------------


CALIBRATION = [metrics.accuracy, metrics.expected_calibration_error, metrics.negative_log_likelihood,
               metrics.brier_score]


@pytest.mark.parametrize("metric", CALIBRATION, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_nonfinite_rows_raise_with_a_count_or_are_skipped(metric, bad_value: float) -> None:
    logits, targets = random_ensemble(3, 9, 4, seed=5)
    probs = metrics.ensemble_probs(logits)
    broken = probs.clone()
    broken[2, 1] = bad_value
    broken[7] = bad_value
    with pytest.raises(ValueError, match=r"probs: 2 of 9 samples have NaN or Inf probabilities; the first is sample 2"):
        metric(broken, targets)
    keep = torch.ones(9, dtype=torch.bool)
    keep[[2, 7]] = False
    assert metric(broken, targets, nonfinite="skip").item() == metric(probs[keep], targets[keep]).item()
    with pytest.raises(ValueError, match="nothing to evaluate: probs has no samples left after skipping 9"):
        metric(torch.full_like(probs, bad_value), targets, nonfinite="skip")
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        metric(probs, targets, nonfinite="ignore")


def test_nonfinite_logits_through_ensemble_probs() -> None:
    logits, targets = random_ensemble(3, 9, 4, seed=6)
    logits[1, 4, 0] = float("nan")      # one member's NaN spoils the sample
    logits[0, 6, 2] = float("inf")      # +Inf: softmax is inf/inf
    logits[:, 8] = float("-inf")        # no finite logit
    logits[:, 3, 1] = float("-inf")     # a masked class: fine, its probability is 0
    probs = metrics.ensemble_probs(logits)
    assert probs[3, 1] == 0 and torch.isfinite(probs[3]).all()
    with pytest.raises(ValueError, match="3 of 9 samples"):
        metrics.expected_calibration_error(probs, targets)


def test_fit_temperature_follows_the_nonfinite_rule() -> None:
    generator = torch.Generator().manual_seed(7)
    logits = 3 * torch.randn(2, 500, 4, generator=generator, dtype=torch.float64)
    targets = torch.multinomial(torch.softmax(logits[0] / 2.0, dim=-1), 1, generator=generator).squeeze(1)
    broken = logits.clone()
    broken[0, 10, 1] = float("nan")
    broken[1, 20] = float("inf")
    with pytest.raises(ValueError, match="logits: 2 of 500 samples have NaN or Inf probabilities"):
        metrics.fit_temperature(broken, targets)
    keep = torch.ones(500, dtype=torch.bool)
    keep[[10, 20]] = False
    skipped = metrics.fit_temperature(broken, targets, nonfinite="skip")
    assert math.isfinite(skipped)
    assert skipped == pytest.approx(metrics.fit_temperature(logits[:, keep], targets[keep]), rel=1e-6)
    with pytest.raises(ValueError, match="1 of 500 samples"):
        metrics.fit_temperature(broken[0], targets)


def test_fit_temperature_with_a_masked_class_equals_the_fit_without_it() -> None:
    generator = torch.Generator().manual_seed(8)
    logits = 3 * torch.randn(400, 5, generator=generator, dtype=torch.float64)
    targets = torch.multinomial(torch.softmax(logits[:, 1:] / 1.5, dim=-1), 1, generator=generator).squeeze(1) + 1
    masked = logits.clone()
    masked[:, 0] = float("-inf")  # class 0 masked out (never a target)
    got = metrics.fit_temperature(masked, targets)
    assert math.isfinite(got)
    assert got == pytest.approx(metrics.fit_temperature(logits[:, 1:], targets - 1), rel=1e-6)


def test_scores_with_nan_raise_or_are_skipped() -> None:
    uncertainty = torch.tensor([0.1, float("nan"), 0.3, 0.2, 0.9], dtype=torch.float64)
    correct = torch.tensor([True, True, False, True, False])
    for function in (metrics.aurc, metrics.error_auroc):
        with pytest.raises(ValueError, match="uncertainty: 1 of 5 samples have NaN or Inf values"):
            function(uncertainty, correct)
        keep = torch.tensor([True, False, True, True, True])
        assert function(uncertainty, correct, nonfinite="skip").item() == function(uncertainty[keep],
                                                                                     correct[keep]).item()
    with pytest.raises(ValueError, match="uncertainty_out: 1 of 5 samples"):
        metrics.ood_auroc(torch.rand(3, dtype=torch.float64), uncertainty)


# --- bad input ----------------------------------------------------------------------------------------


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ValueError, match=r"probs must be probabilities in \[0, 1\].*ensemble_probs"):
        metrics.accuracy(torch.randn(4, 3) * 5, TARGETS)
    with pytest.raises(TypeError, match="targets must hold integer class indices, got dtype torch.float32"):
        metrics.brier_score(PROBS, TARGETS.float())
    with pytest.raises(ValueError, match=r"indices in \[0, 3\) for probs of shape \(4, 3\), got values from 0 to 3"):
        metrics.negative_log_likelihood(PROBS, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(TypeError, match="probs must be a floating-point tensor, got dtype torch.int64"):
        metrics.accuracy(PROBS.long(), TARGETS)
    with pytest.raises(TypeError, match="correct must be a bool tensor, got torch.int64"):
        metrics.aurc(torch.rand(4, dtype=torch.float64), torch.tensor([1, 0, 1, 1]))
    with pytest.raises(ValueError, match=r"correct shape \(3,\) must equal uncertainty shape \(4,\)"):
        metrics.error_auroc(torch.rand(4, dtype=torch.float64), torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="AUROC needs positive and negative samples, got 0 positive and 4 negative"):
        metrics.error_auroc(torch.rand(4, dtype=torch.float64), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"logits must be \[B, C\] or \[N, B, C\], got shape \(4,\)"):
        metrics.fit_temperature(torch.randn(4), TARGETS)


# --- conventions at the edges (issue 23) --------------------------------------------------------------


@pytest.mark.parametrize("fn", [metrics.mutual_information, metrics.expected_entropy, metrics.member_variance,
                                metrics.disagreement])
def test_per_member_functions_refuse_a_missing_member_dim(fn) -> None:
    mean_probs = torch.softmax(torch.randn(8, 4), -1)  # [B, C]: the member dim forgotten
    with pytest.raises(ValueError, match=r"member_probs must be \[N, B, C\].*got shape \(8, 4\)"):
        fn(mean_probs)


@pytest.mark.parametrize("fn", [metrics.accuracy, metrics.negative_log_likelihood, metrics.brier_score,
                                metrics.expected_calibration_error, metrics.reliability_bins])
def test_calibration_metrics_refuse_rows_that_do_not_sum_to_one(fn) -> None:
    scores = torch.sigmoid(torch.randn(64, 4))  # in [0, 1], rows sum to 1.1 .. 2.8
    targets = torch.randint(0, 4, (64,))
    with pytest.raises(ValueError, match=r"probs rows must sum to 1 .*float32 over C=4.*softmax"):
        fn(scores, targets)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("classes", [2, 10, 1000])
def test_rounded_probabilities_of_every_dtype_are_accepted(dtype: torch.dtype, classes: int) -> None:
    """The tolerance covers a softmax computed in (or cast to) the dtype, and fp32 probabilities cast up."""
    logits = torch.randn(3, 64, classes) * 3
    targets = torch.randint(0, classes, (64,))
    for probs in (logits.to(dtype).softmax(-1).mean(0), logits.softmax(-1).mean(0).to(dtype),
                  logits.float().softmax(-1).mean(0).double()):
        assert torch.isfinite(metrics.expected_calibration_error(probs, targets))
        assert torch.isfinite(metrics.negative_log_likelihood(probs, targets))


@pytest.mark.parametrize(("dtype", "nats"), [(torch.float32, 87.3365), (torch.bfloat16, 87.3365),
                                             (torch.float16, 9.7041), (torch.float64, 708.3964)])
def test_nll_floors_a_zero_probability_at_the_given_dtypes_smallest_normal(dtype: torch.dtype, nats: float) -> None:
    probs = torch.tensor([[1.0, 0.0]], dtype=dtype)
    assert metrics.negative_log_likelihood(probs, torch.tensor([1])).item() == pytest.approx(nats, abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_confidence_of_exactly_k_over_n_is_in_the_bin_below_its_edge(dtype: torch.dtype) -> None:
    """Bins are (i/n, (i+1)/n]: a confidence of exactly k/n (k >= 1) is in bin k - 1, for every k and every
    n up to 100, whether it is the division k / n or the mean of n one-hot members (k of them voting for the
    top class). torch.linspace's edges put some of them in bin k (n = 20, 25, ...)."""
    for n in range(1, 101):
        k = torch.arange(1, n + 1)
        by_division = (k.to(dtype) / n)
        votes = (torch.arange(n)[None, :] < k[:, None]).to(dtype)  # [k, n]: the first k of n members vote
        by_mean = votes.mean(dim=1)
        for conf in (by_division, by_mean):
            half = conf[(conf > 0.5)]  # two classes: the top-label confidence must be >= 1/2
            kk = k[conf > 0.5]
            probs = torch.stack([half, 1 - half], dim=1)
            bins = metrics.reliability_bins(probs, torch.zeros(len(half), dtype=torch.long), n_bins=n)
            want = torch.zeros(n, dtype=torch.float64)
            want.index_add_(0, kk - 1, torch.ones(len(kk), dtype=torch.float64))
            assert torch.equal(bins.count, want), (n, bins.count.nonzero().flatten().tolist(), (kk - 1).tolist())


def test_bin_edges_are_the_doubles_nearest_k_over_n() -> None:
    from fractions import Fraction

    for n in range(1, 101):
        edges = metrics.reliability_bins(PROBS, TARGETS, n_bins=n).edges
        for k in range(n + 1):
            assert Fraction(edges[k].item()) == Fraction(k / n)  # Python's k / n is the correctly rounded double
