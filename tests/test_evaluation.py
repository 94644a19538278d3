"""``EnsembleMetrics``: batches and processes give the whole-set results of ``lora_ensemble.metrics``,
which torchmetrics confirms streaming too; bad input leaves the state alone; 2 gloo processes on CPU
give every rank the metrics of the whole, sharded test set."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ensemble import metrics
from lora_ensemble.evaluation import EnsembleMetrics

from .test_distributed import run_ranks
from .test_metrics import random_ensemble

TOL = 1e-12  # float64 sums in another order


def whole_set(logits: torch.Tensor, targets: torch.Tensor, n_bins: int, convention: str) -> dict[str, float]:
    """What ``EnsembleMetrics.compute`` must return, from the whole-tensor functions."""
    prediction = metrics.ensemble_probs(logits, convention)
    mean_probs = metrics.ensemble_probs(logits)
    want = {
        "accuracy": metrics.accuracy(prediction, targets).item(),
        "ece": metrics.expected_calibration_error(prediction, targets, n_bins).item(),
        "nll": metrics.negative_log_likelihood(mean_probs, targets).item(),
        "brier": metrics.brier_score(mean_probs, targets).item(),
    }
    if logits.dim() == 3 and logits.shape[0] > 1:
        want["disagreement"] = metrics.disagreement(logits.softmax(-1)).mean().item()
    return {**want, "samples": targets.numel(), "skipped": 0}


def assert_results_equal(got: dict[str, float], want: dict[str, float]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=TOL), name


def stream(evaluation: EnsembleMetrics, logits: torch.Tensor, targets: torch.Tensor, sizes: list[int]) -> None:
    for chunk, chunk_targets in zip(logits.split(sizes, dim=-2), targets.split(sizes), strict=True):
        evaluation.update(chunk, chunk_targets)


@settings(max_examples=20, deadline=None)
@given(members=st.integers(1, 4), classes=st.integers(2, 12), cuts=st.lists(st.integers(0, 40), max_size=5),
       batch=st.integers(1, 40), n_bins=st.sampled_from([1, 10, 15]),
       convention=st.sampled_from(["mean_probs", "mean_logits"]), seed=st.integers(0, 2**16))
def test_batches_give_the_whole_set_results(members: int, classes: int, cuts: list[int], batch: int, n_bins: int,
                                            convention: str, seed: int) -> None:
    logits, targets = random_ensemble(members, batch, classes, seed)
    bounds = sorted({0, batch, *(min(c, batch) for c in cuts)})
    sizes = [b - a for a, b in zip(bounds, bounds[1:], strict=False)] + [0]  # an empty batch too
    evaluation = EnsembleMetrics(n_bins, convention)
    stream(evaluation, logits, targets, sizes)
    assert_results_equal(evaluation.compute(), whole_set(logits, targets, n_bins, convention))

    prediction = metrics.ensemble_probs(logits, convention)
    want_bins = metrics.reliability_bins(prediction, targets, n_bins)
    assert torch.equal(evaluation.reliability_bins().count, want_bins.count)
    scores = evaluation.scores()
    mean_probs = metrics.ensemble_probs(logits)
    torch.testing.assert_close(scores["confidence"], prediction.max(-1).values, rtol=0, atol=TOL)
    assert torch.equal(scores["correct"], prediction.argmax(-1) == targets)
    torch.testing.assert_close(scores["predictive_entropy"], metrics.entropy(mean_probs), rtol=0, atol=TOL)
    torch.testing.assert_close(scores["mutual_information"], metrics.mutual_information(logits.softmax(-1)),
                               rtol=0, atol=TOL)


def test_one_model_logits_and_no_disagreement() -> None:
    logits, targets = random_ensemble(1, 23, 3, seed=0)
    evaluation = EnsembleMetrics()
    stream(evaluation, logits[0], targets, [20, 3])
    results = evaluation.compute()
    assert "disagreement" not in results
    assert_results_equal(results, whole_set(logits[0], targets, 15, "mean_probs"))


@pytest.mark.parametrize("convention,n_bins", [("mean_probs", 15), ("mean_logits", 10)])
def test_streaming_matches_torchmetrics_streaming(convention: str, n_bins: int) -> None:
    from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

    logits, targets = random_ensemble(4, 301, 10, seed=1)
    sizes = [64, 1, 100, 136]
    evaluation = EnsembleMetrics(n_bins, convention)
    stream(evaluation, logits, targets, sizes)
    ece = MulticlassCalibrationError(num_classes=10, n_bins=n_bins)
    acc = MulticlassAccuracy(num_classes=10, average="micro")
    for chunk, chunk_targets in zip(logits.split(sizes, dim=1), targets.split(sizes), strict=True):
        prediction = chunk.softmax(-1).mean(0) if convention == "mean_probs" else chunk.mean(0).softmax(-1)
        ece.update(prediction, chunk_targets)
        acc.update(prediction, chunk_targets)
    results = evaluation.compute()
    assert results["ece"] == pytest.approx(ece.compute().item(), abs=1e-6)
    assert results["accuracy"] == pytest.approx(acc.compute().item(), abs=1e-6)
    # NLL uses the mean of member probabilities in both conventions, as the paper's code does
    want_nll = torch.nn.functional.nll_loss(logits.softmax(-1).mean(0).log(), targets)
    assert results["nll"] == pytest.approx(want_nll.item(), abs=TOL)


def test_nonfinite_samples_raise_before_any_state_changes_or_are_skipped_and_counted() -> None:
    logits, targets = random_ensemble(3, 30, 4, seed=2)
    broken = logits.clone()
    broken[2, 5, 1] = float("nan")
    broken[0, 17] = float("inf")
    broken[:, 21, 3] = float("-inf")  # a masked class, not an error
    evaluation = EnsembleMetrics()
    evaluation.update(logits[:, :10], targets[:10])
    before = evaluation.compute()
    with pytest.raises(ValueError, match=r"logits: 2 of 30 samples have NaN or Inf probabilities .*first is sample 5"):
        evaluation.update(broken, targets)
    assert evaluation.compute() == before

    skipping = EnsembleMetrics(convention="mean_logits", nonfinite="skip")
    stream(skipping, broken, targets, [7, 23])
    keep = torch.ones(30, dtype=torch.bool)
    keep[[5, 17]] = False
    want = whole_set(broken[:, keep], targets[keep], 15, "mean_logits")
    assert_results_equal(skipping.compute(), {**want, "skipped": 2})
    assert skipping.scores()["confidence"].shape == (28,)


def test_bad_updates_name_the_shapes_and_leave_the_state_alone() -> None:
    logits, targets = random_ensemble(3, 12, 5, seed=3)
    evaluation = EnsembleMetrics(10)
    evaluation.update(logits, targets)
    before, before_scores = evaluation.compute(), evaluation.scores()
    bad_updates = [  # (logits, targets, error, message)
        (logits[0, 0], targets, ValueError, r"logits must be member logits \[N, B, C\] or \[B, C\], got shape \(5,\)"),
        (logits[:, :, :4], targets, ValueError, r"\(members, classes\) = \(3, 4\), but earlier updates had \(3, 5\)"),
        (logits[:2], targets, ValueError, r"\(members, classes\) = \(2, 5\)"),
        (logits, targets[:11], ValueError, r"targets shape \(11,\) must be \[B\] = \(12,\)"),
        (logits, targets.float(), TypeError, "targets must hold integer class indices"),
        (logits, targets + 1, ValueError, r"class indices in \[0, 5\) for logits of shape \(3, 12, 5\)"),
        (logits.long(), targets, TypeError, "logits must be a floating-point tensor"),
    ]
    for bad_logits, bad_targets, error, message in bad_updates:
        with pytest.raises(error, match=message):
            evaluation.update(bad_logits, bad_targets)
    assert evaluation.compute() == before
    assert all(torch.equal(evaluation.scores()[k], v) for k, v in before_scores.items())
    with pytest.raises(ValueError, match="convention must be one of"):
        EnsembleMetrics(convention="paper")
    with pytest.raises(ValueError, match="n_bins must be a positive int"):
        EnsembleMetrics(0)


def test_reset_and_empty_states() -> None:
    logits, targets = random_ensemble(2, 8, 3, seed=4)
    evaluation = EnsembleMetrics(keep_scores=False)
    with pytest.raises(ValueError, match="no samples to evaluate"):
        evaluation.compute()
    evaluation.update(logits, targets)
    with pytest.raises(RuntimeError, match="keep_scores=True"):
        evaluation.scores()
    evaluation.reset()
    evaluation.update(logits[:, :, :2], targets.clamp(max=1))  # a new shape after reset is fine
    assert evaluation.compute()["samples"] == 8
    skipping = EnsembleMetrics(nonfinite="skip")
    skipping.update(torch.full((2, 3, 4), float("nan")), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="all 3 seen were skipped as NaN or Inf"):
        skipping.compute()


# --- two processes ----------------------------------------------------------------------------------

DIST_CASES = {  # name -> samples of each rank (in batches), out of one test set of 37
    "uneven": [[5, 0, 18], [1, 13]],
    "rank 1 empty": [[30, 7], []],
}


def _distributed_worker(rank: int) -> dict:
    logits, targets = random_ensemble(3, 37, 6, seed=5)
    results = {}
    for case, sizes in DIST_CASES.items():
        start = sum(sum(s) for s in sizes[:rank])
        stop = start + sum(sizes[rank])
        for convention, n_bins in (("mean_probs", 15), ("mean_logits", 10)):
            evaluation = EnsembleMetrics(n_bins, convention)
            stream(evaluation, logits[:, start:stop], targets[start:stop], sizes[rank])
            results[case, convention] = {"compute": evaluation.compute(), "scores": evaluation.scores(),
                                         "count": evaluation.reliability_bins().count,
                                         "again": evaluation.compute()}  # synchronising leaves the state local
    local = EnsembleMetrics(sync_on_compute=False)
    local.update(logits[:, :10 * (rank + 1)], targets[:10 * (rank + 1)])
    results["local"] = local.compute()
    mismatched = EnsembleMetrics()
    mismatched.update(logits[:, :4, :5 + rank], targets[:4].clamp(max=4))
    try:
        mismatched.compute()
    except ValueError as error:
        results["mismatch"] = str(error)
    return results


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_ranks(_distributed_worker, tmp_path_factory, "evaluation")


@pytest.mark.parametrize("case", list(DIST_CASES))
def test_two_processes_give_every_rank_the_whole_set_results(distributed_results: list[dict], case: str) -> None:
    logits, targets = random_ensemble(3, 37, 6, seed=5)
    for convention, n_bins in (("mean_probs", 15), ("mean_logits", 10)):
        one_process = EnsembleMetrics(n_bins, convention)
        one_process.update(logits, targets)
        want_scores = one_process.scores()
        for rank, results in enumerate(distributed_results):
            got = results[case, convention]
            assert_results_equal(got["compute"], whole_set(logits, targets, n_bins, convention))
            assert got["again"] == got["compute"]
            assert torch.equal(got["count"], one_process.reliability_bins().count), (rank, convention)
            for name, want in want_scores.items():  # rank 0's samples first: the original order
                torch.testing.assert_close(got["scores"][name], want, rtol=0, atol=TOL)


def test_two_processes_local_results_and_shape_mismatch(distributed_results: list[dict]) -> None:
    logits, targets = random_ensemble(3, 37, 6, seed=5)
    for rank, results in enumerate(distributed_results):
        rows = 10 * (rank + 1)
        assert_results_equal(results["local"], whole_set(logits[:, :rows], targets[:rows], 15, "mean_probs"))
        assert results["mismatch"] == ("ranks saw different (members, classes) shapes, rank by rank: "
                                       "[(3, 5), (3, 6)]")
