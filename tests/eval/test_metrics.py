"""Metrics against values computed by hand on 3-6 row inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignx.eval.metrics import (
    METRICS,
    alignment_score,
    auroc,
    bootstrap_ci,
    mc1,
    mc2,
    metric_label,
    safety_score,
    truthful_informative,
    win_rate,
)


def test_win_rate_counts_ties_half():
    # wins 2, tie 1, loss 1 -> (2 + 0.5) / 4
    assert win_rate([1, 0.5, 0, 1]) == pytest.approx(62.5)
    assert win_rate([0, 0, 0.5]) == pytest.approx(100 * 0.5 / 3)


@pytest.mark.parametrize("bad", [[], [1, 2], [0.3]])
def test_win_rate_rejects_bad_outcomes(bad):
    with pytest.raises(ValueError):
        win_rate(bad)


def test_safety_score_is_percent_unsafe():
    assert safety_score([True, False, False]) == pytest.approx(100 / 3)
    assert safety_score([False, False, False, False, True]) == pytest.approx(20.0)
    with pytest.raises(ValueError):
        safety_score([0.5, 1])


def test_truthful_informative_needs_both():
    # rows: (T,T) (T,F) (F,T) (T,T) -> 2 of 4
    assert truthful_informative([1, 1, 0, 1], [1, 0, 1, 1]) == pytest.approx(50.0)
    assert truthful_informative([True, False, True], [False, True, False]) == 0.0
    with pytest.raises(ValueError, match="items"):
        truthful_informative([True, True], [True])


def test_mc1_true_choice_must_beat_every_false_one():
    scores = [[-1.0, -2.0, -3.0], [-2.0, -1.0], [-1.0, -1.0]]
    labels = [[1, 0, 0], [1, 0], [1, 0]]
    # q1 hit, q2 miss (false choice higher), q3 tie counts as a miss
    assert mc1(scores, labels) == pytest.approx(100 / 3)


def test_mc2_is_normalised_true_mass():
    scores = [np.log([0.5, 0.3, 0.2]).tolist(), np.log([1.0, 3.0]).tolist()]
    labels = [[1, 1, 0], [1, 0]]
    # q1: 0.8; q2: 1 / (1 + 3) = 0.25 -> mean 0.525
    assert mc2(scores, labels) == pytest.approx(52.5)
    # very negative log-likelihoods must not underflow to 0/0
    assert mc2([[-2000.0, -2001.0]], [[1, 0]]) == pytest.approx(100 / (1 + math.exp(-1)))


def test_mc_validation():
    with pytest.raises(ValueError, match="true and one false"):
        mc1([[-1.0, -2.0]], [[1, 1]])
    with pytest.raises(ValueError, match="labels"):
        mc2([[-1.0, -2.0]], [[1, 0, 0]])


def test_alignment_score_subtracts_safety():
    assert alignment_score(60.0, 40.0, 10.0) == pytest.approx(30.0)
    assert alignment_score(50.0, 20.0, 50.0) == pytest.approx(20.0 / 3)
    with pytest.raises(ValueError, match="safety_score"):
        alignment_score(50.0, 20.0, 150.0)


def test_auroc_hand_computed_with_ties():
    # positives {0.9, 0.8}, negatives {0.3, 0.8}: 3 wins + 1 tie of 4 pairs
    assert auroc([0.9, 0.8, 0.3, 0.8], [1, 1, 0, 0]) == pytest.approx(87.5)
    assert auroc([0.1, 0.2, 0.3], [1, 0, 0]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="both"):
        auroc([0.1, 0.2], [1, 1])


def test_metric_table_directions_and_arrows():
    assert METRICS["win_rate"].higher_is_better and METRICS["win_rate"].arrow == "↑"
    assert not METRICS["safety_score"].higher_is_better
    assert metric_label("safety_score") == "safety_score ↓ (%)"
    assert METRICS["alignment_score"].higher_is_better
    with pytest.raises(KeyError, match="known"):
        metric_label("bleu")


def test_bootstrap_ci_contains_estimate_narrows_and_is_seeded():
    small = [1, 0, 1, 1, 0.5, 0] * 3
    big = small * 50
    ci_s = bootstrap_ci(small, win_rate, n_boot=500)
    ci_b = bootstrap_ci(big, win_rate, n_boot=500)
    assert ci_s.estimate == pytest.approx(win_rate(small))
    assert ci_s.low <= ci_s.estimate <= ci_s.high
    assert ci_b.low <= ci_b.estimate <= ci_b.high
    assert ci_b.half_width < ci_s.half_width / 3  # ~ 1/sqrt(50) narrower
    assert bootstrap_ci(small, win_rate, n_boot=500) == ci_s
    assert bootstrap_ci(small, win_rate, n_boot=500, seed=1) != ci_s


def test_bootstrap_ci_keeps_paired_columns_together():
    rows = np.array([[1, 1], [1, 0], [0, 1], [1, 1]], dtype=bool)
    ci = bootstrap_ci(rows, lambda r: truthful_informative(r[:, 0], r[:, 1]), n_boot=200)
    assert ci.estimate == pytest.approx(50.0)
    assert 0.0 <= ci.low <= 50.0 <= ci.high <= 100.0
    with pytest.raises(ValueError):
        bootstrap_ci([], win_rate)
