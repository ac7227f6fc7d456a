"""Router metrics against values computed by hand on 4-row inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignx.router import metrics

# argmax = 0, 1, 2, 0 ; labels 0, 1, 0, 1 -> rows 0 and 1 right, rows 2 and 3 wrong
PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
LABELS = np.array([0, 1, 0, 1])


def test_accuracy() -> None:
    assert metrics.accuracy(PROBS, LABELS) == pytest.approx(0.5)


def test_macro_f1() -> None:
    # class 0: tp=1 fp=1 fn=1 -> 0.5 ; class 1: tp=1 fp=0 fn=1 -> 2/3 ; class 2: tp=0 fp=1 -> 0
    assert metrics.macro_f1(PROBS, LABELS) == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)


def test_nll() -> None:
    expected = -(math.log(0.7) + math.log(0.6) + math.log(0.3) + math.log(0.4)) / 4
    assert metrics.nll(PROBS, LABELS) == pytest.approx(expected)


def test_nll_confident_miss_is_finite() -> None:
    assert metrics.nll(np.array([[1.0, 0.0]]), np.array([1])) == pytest.approx(-math.log(1e-12))


def test_brier() -> None:
    # rows: 0.14, 0.26, 0.74, 0.62
    assert metrics.brier(PROBS, LABELS) == pytest.approx(0.44)


def test_ece_two_bins() -> None:
    # bin (0, .5]: conf .4, .5 both wrong -> |0 - .45| ; bin (.5, 1]: .7, .6 right -> |1 - .65|
    assert metrics.ece(PROBS, LABELS, n_bins=2) == pytest.approx((2 * 0.45 + 2 * 0.35) / 4)


def test_ece_zero_when_calibrated() -> None:
    probs = np.tile([0.75, 0.25], (4, 1))
    assert metrics.ece(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.0)


def test_reliability_bins() -> None:
    bins = metrics.reliability_bins(PROBS, LABELS, n_bins=2)
    np.testing.assert_allclose(bins.edges, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(bins.count, [2, 2])
    np.testing.assert_allclose(bins.confidence, [0.45, 0.65])
    np.testing.assert_allclose(bins.accuracy, [0.0, 1.0])


def test_reliability_bins_empty_bin_is_nan() -> None:
    bins = metrics.reliability_bins(PROBS, LABELS, n_bins=15)
    assert bins.count.sum() == 4
    assert np.isnan(bins.accuracy[0]) and bins.count[0] == 0


def test_selective_accuracy() -> None:
    # by confidence: .7 (right), .6 (right), .5 (wrong), .4 (wrong)
    assert metrics.selective_accuracy(PROBS, LABELS, coverage=0.5) == pytest.approx(1.0)
    assert metrics.selective_accuracy(PROBS, LABELS, coverage=0.75) == pytest.approx(2 / 3)
    assert metrics.selective_accuracy(PROBS, LABELS, coverage=1.0) == pytest.approx(0.5)


def test_confident_errors_counts_misroutes_at_or_above_the_confidence() -> None:
    # wrong rows: 2 (confidence .4, label 0) and 3 (confidence .5, label 1)
    assert metrics.confident_errors(PROBS, LABELS, threshold=0.0) == pytest.approx(0.5)
    assert metrics.confident_errors(PROBS, LABELS, threshold=0.45) == pytest.approx(0.25)
    assert metrics.confident_errors(PROBS, LABELS, threshold=0.5) == pytest.approx(0.25)  # >=
    assert metrics.confident_errors(PROBS, LABELS, threshold=0.9) == 0.0
    # among one true class: label 1 is rows 1 (right) and 3 (wrong at .5)
    assert metrics.confident_errors(PROBS, LABELS, 0.5, among=1) == pytest.approx(0.5)
    assert metrics.confident_errors(PROBS, LABELS, 0.0, among=0) == pytest.approx(0.5)
    assert metrics.confident_errors(PROBS, LABELS, 0.0, among=2) == 0.0  # no such row


def test_scores_is_every_report_metric_of_one_row() -> None:
    row = metrics.scores(PROBS, LABELS, n_bins=5)
    assert row == {
        "accuracy": metrics.accuracy(PROBS, LABELS),
        "macro_f1": metrics.macro_f1(PROBS, LABELS),
        "nll": metrics.nll(PROBS, LABELS),
        "ece": metrics.ece(PROBS, LABELS, 5),
        "brier": metrics.brier(PROBS, LABELS),
        "selective_accuracy_90": metrics.selective_accuracy(PROBS, LABELS, 0.9),
        "confident_errors_90": metrics.confident_errors(PROBS, LABELS, 0.9),
    }
    assert row["accuracy"] == pytest.approx(0.5)


def test_auroc_with_ties() -> None:
    # 0.9 beats 3 ; 0.4 beats 0.1, ties 0.4, loses to 0.5 -> 1.5 ; 0.6 beats 3 -> 7.5 / 9
    assert metrics.auroc([0.9, 0.4, 0.6], [0.1, 0.4, 0.5]) == pytest.approx(7.5 / 9)
    assert metrics.auroc([2.0, 3.0], [0.0, 1.0]) == pytest.approx(1.0)
    assert metrics.auroc([0.0], [1.0]) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        (np.zeros((0, 3)), np.zeros(0, dtype=int), "empty"),
        (PROBS, LABELS[:3], "disagree on N"),
        (PROBS[0], LABELS[:1], "shape"),
        (PROBS, np.array([0, 1, 3, 1]), r"\[0, 3\)"),
        (PROBS, np.array([0.0, 1.0, 0.0, 1.0]), "integers"),
    ],
)
def test_bad_input_names_the_argument(probs: np.ndarray, labels: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        metrics.accuracy(probs, labels)


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="coverage"):
        metrics.selective_accuracy(PROBS, LABELS, coverage=0.0)
    with pytest.raises(ValueError, match="n_bins"):
        metrics.ece(PROBS, LABELS, n_bins=0)
    with pytest.raises(ValueError, match="scores_neg"):
        metrics.auroc([1.0], [])
    with pytest.raises(ValueError, match="threshold"):
        metrics.confident_errors(PROBS, LABELS, threshold=1.5)
    with pytest.raises(ValueError, match="among"):
        metrics.confident_errors(PROBS, LABELS, among=3)


def _confidences(conf: np.ndarray) -> np.ndarray:
    """Two-class probabilities whose top label is class 0 with the given confidence."""
    return np.stack([conf, 1.0 - conf], axis=1)


def test_ece_gap_bootstrap_resamples_match_the_plain_ece() -> None:
    rng = np.random.default_rng(3)
    probs = _confidences(rng.uniform(0.5, 1.0, 300))
    labels = (rng.uniform(size=300) > probs[:, 0]).astype(np.int64)  # calibrated by design
    idx = rng.integers(0, 300, size=(5, 300))
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    fast = metrics._ece_resampled(conf, correct, idx, 15)
    slow = [metrics.ece(probs[i], labels[i]) for i in idx]
    np.testing.assert_allclose(fast, slow, atol=1e-12)


def test_ece_gap_bootstrap_prefers_the_calibrated_system() -> None:
    rng = np.random.default_rng(0)
    p_true = rng.uniform(0.5, 1.0, 2000)
    labels = (rng.uniform(size=2000) > p_true).astype(np.int64)  # class 0 with prob p_true
    calibrated = _confidences(p_true)
    overconfident = _confidences(np.minimum(p_true + 0.15, 0.999))
    gap = metrics.ece_gap_bootstrap(calibrated, overconfident, labels, n_boot=300)
    assert gap["diff"] == pytest.approx(gap["ece_a"] - gap["ece_b"])
    assert gap["ece_a"] < 0.03 < 0.1 < gap["ece_b"]
    assert gap["ci95_low"] <= gap["diff"] <= gap["ci95_high"] < 0
    assert gap["p_a_lower"] == 1.0
    # the same system against itself: no difference in any resample
    same = metrics.ece_gap_bootstrap(calibrated, calibrated, labels, n_boot=100)
    assert same["ci95_low"] == same["ci95_high"] == 0.0 and same["p_a_lower"] == 0.0


def test_ece_gap_bootstrap_bad_input() -> None:
    with pytest.raises(ValueError, match="same shape"):
        metrics.ece_gap_bootstrap(PROBS, PROBS[:, :1], LABELS)
    with pytest.raises(ValueError, match="n_boot"):
        metrics.ece_gap_bootstrap(PROBS, PROBS, LABELS, n_boot=10)


def test_ece_if_calibrated_matches_the_ece_of_labels_drawn_from_the_confidences() -> None:
    rng = np.random.default_rng(5)
    probs = _confidences(rng.uniform(0.5, 1.0, 400))
    null = metrics.ece_if_calibrated(probs, n_sim=400, seed=1)
    # the same experiment by hand: labels drawn from the confidences, plain ECE each time
    draws = [metrics.ece(probs, (rng.uniform(size=400) > probs[:, 0]).astype(np.int64))
             for _ in range(400)]
    assert null["mean"] == pytest.approx(np.mean(draws), rel=0.1)
    assert 0 < null["mean"] < null["p95"]
    # the floor shrinks with more rows, and a certain system has none
    big = metrics.ece_if_calibrated(_confidences(rng.uniform(0.5, 1.0, 4000)), n_sim=200)
    assert big["mean"] < null["mean"] / 2
    assert metrics.ece_if_calibrated(_confidences(np.ones(50)), n_sim=100) == {
        "mean": 0.0, "p95": 0.0}
    # few rows, all near-certain: a miss is rare but costs ~1/N, so the mean can sit above the
    # 95th percentile (the tiny test run's router is like this on its 24 test prompts)
    rare = metrics.ece_if_calibrated(_confidences(np.full(24, 0.999)), n_sim=2000, seed=0)
    assert rare["p95"] == pytest.approx(0.001) and rare["mean"] > rare["p95"]


def test_ece_if_calibrated_separates_calibrated_from_overconfident() -> None:
    rng = np.random.default_rng(0)
    p_true = rng.uniform(0.5, 1.0, 1000)
    labels = (rng.uniform(size=1000) > p_true).astype(np.int64)
    over = _confidences(np.minimum(p_true + 0.1, 0.999))
    assert metrics.ece(_confidences(p_true), labels) <= metrics.ece_if_calibrated(
        _confidences(p_true))["p95"]
    assert metrics.ece(over, labels) > metrics.ece_if_calibrated(over)["p95"]
    with pytest.raises(ValueError, match="n_sim"):
        metrics.ece_if_calibrated(PROBS, n_sim=10)
    with pytest.raises(ValueError, match="non-empty"):
        metrics.ece_if_calibrated(np.zeros((0, 3)))


def test_calibration_by_predicted_class_by_hand() -> None:
    # predicted 0: rows 0 (right, 0.7) and 3 (wrong, 0.5); predicted 1: row 1 (right, 0.6);
    # predicted 2: row 2 (wrong, 0.4)
    out = metrics.calibration_by_predicted_class(PROBS, LABELS, ["help", "harm", "honest"])
    assert list(out) == ["help", "harm", "honest"]
    assert out["help"]["n"] == 2
    assert out["help"]["confidence"] == pytest.approx(0.6)
    assert out["help"]["accuracy"] == pytest.approx(0.5)
    assert out["help"]["gap"] == pytest.approx(0.1)
    assert out["harm"] == pytest.approx({"n": 1, "confidence": 0.6, "accuracy": 1.0, "gap": -0.4})
    assert out["honest"] == pytest.approx({"n": 1, "confidence": 0.4, "accuracy": 0.0, "gap": 0.4})
    # a class nobody predicts has no confidence to report (None keeps the report valid JSON)
    never = metrics.calibration_by_predicted_class(PROBS[:2], LABELS[:2])
    assert never["2"] == {"n": 0, "confidence": None, "accuracy": None, "gap": None}
    with pytest.raises(ValueError, match="names has 2 entries for 3 classes"):
        metrics.calibration_by_predicted_class(PROBS, LABELS, ["a", "b"])


def test_calibration_by_predicted_class_weighted_by_hand() -> None:
    # predicted 0: rows 0 (right, 0.7, weight 3) and 3 (wrong, 0.5, weight 1)
    w = np.array([3.0, 1.0, 1.0, 1.0])
    out = metrics.calibration_by_predicted_class(PROBS, LABELS, sample_weight=w)
    assert out["0"] == pytest.approx({"n": 2, "confidence": 0.65, "accuracy": 0.75, "gap": -0.1})
    assert out["1"] == pytest.approx({"n": 1, "confidence": 0.6, "accuracy": 1.0, "gap": -0.4})
    # unit weights are the unweighted means
    assert metrics.calibration_by_predicted_class(PROBS, LABELS, sample_weight=np.ones(4)) == (
        metrics.calibration_by_predicted_class(PROBS, LABELS))
    # a class predicted only on rows of weight 0 has rows but no weighted mean
    zero = metrics.calibration_by_predicted_class(PROBS, LABELS, sample_weight=[1, 1, 0, 1])
    assert zero["2"] == {"n": 1, "confidence": None, "accuracy": None, "gap": None}
    for bad in (np.ones(3), -np.ones(4)):
        with pytest.raises(ValueError, match="sample_weight"):
            metrics.calibration_by_predicted_class(PROBS, LABELS, sample_weight=bad)
