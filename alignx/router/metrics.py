"""Stage 2 (MoCaE router): routing-quality and calibration metrics, numpy only.

The router report of METHOD.md Stage 2 scores every ablation row (raw softmax, + temperature,
fractal only, natural only, MoCaE) with the same functions: accuracy, macro-F1, NLL, ECE
(15 equal-width bins), Brier, selective accuracy at 90% coverage, the confident-error rate
(misrouted at confidence >= 0.9: the Axis Collapse the issue names), OOD AUROC, and the bins of
a reliability diagram. Every function takes class probabilities ``probs`` of shape ``(N, A)``
(rows sum to 1) and integer labels of shape ``(N,)`` in ``[0, A)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ReliabilityBins",
    "accuracy",
    "auroc",
    "brier",
    "calibration_by_predicted_class",
    "confident_errors",
    "ece",
    "ece_gap_bootstrap",
    "ece_if_calibrated",
    "macro_f1",
    "nll",
    "reliability_bins",
    "scores",
    "selective_accuracy",
]


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert ``(probs, labels)``; raise ValueError naming the bad argument."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2:
        raise ValueError(f"probs must have shape (N, A), got shape {p.shape}")
    if y.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got shape {y.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(
            f"probs and labels disagree on N: probs has {p.shape[0]} rows, labels {y.shape[0]}"
        )
    if p.shape[0] == 0:
        raise ValueError("probs and labels are empty; need at least one row")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must lie in [0, {p.shape[1]}), got [{y.min()}, {y.max()}]")
    return p, y.astype(np.int64)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose argmax class equals the label.

    Args:
        probs: class probabilities (N, A).
        labels: true classes (N,).

    Returns:
        Accuracy in [0, 1].

    Raises:
        ValueError: for mismatched shapes, empty input or out-of-range labels.
    """
    p, y = _check(probs, labels)
    return float(np.mean(p.argmax(axis=1) == y))


def macro_f1(probs: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean over classes of the F1 score of the argmax prediction.

    Classes that appear neither in the labels nor in the predictions are left out of the mean
    (their F1 is undefined); a class that is predicted but never true scores 0.

    Args:
        probs: class probabilities (N, A).
        labels: true classes (N,).

    Returns:
        Macro-F1 in [0, 1].

    Raises:
        ValueError: for mismatched shapes, empty input or out-of-range labels.
    """
    p, y = _check(probs, labels)
    pred = p.argmax(axis=1)
    scores = []
    for c in range(p.shape[1]):
        tp = np.sum((pred == c) & (y == c))
        fp = np.sum((pred == c) & (y != c))
        fn = np.sum((pred != c) & (y == c))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def nll(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class, ``-mean log p_y`` (natural log).

    Args:
        probs: class probabilities (N, A).
        labels: true classes (N,).
        eps: floor on p_y so a confident miss costs ``-log(eps)`` instead of infinity.

    Returns:
        Mean NLL (>= 0).

    Raises:
        ValueError: for mismatched shapes, empty input or out-of-range labels.
    """
    p, y = _check(probs, labels)
    py = p[np.arange(len(y)), y]  # (N,)
    return float(-np.mean(np.log(np.clip(py, eps, 1.0))))


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over rows of ``sum_a (p_a - 1[a == y])^2`` (in [0, 2]).

    Args:
        probs: class probabilities (N, A).
        labels: true classes (N,).

    Returns:
        Brier score (lower is better).

    Raises:
        ValueError: for mismatched shapes, empty input or out-of-range labels.
    """
    p, y = _check(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of a top-label reliability diagram (equal-width confidence bins).

    Attributes:
        edges: bin edges (n_bins + 1,), from 0 to 1.
        confidence: mean top-label confidence per bin (n_bins,); NaN for an empty bin.
        accuracy: accuracy of the top label per bin (n_bins,); NaN for an empty bin.
        count: number of rows per bin (n_bins,).
    """

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray


def _bin_index(conf: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Equal-width bin edges over [0, 1] (n_bins + 1,) and each confidence's bin (N,)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right-closed bins: searchsorted(side="left") puts conf == edges[b+1] into bin b
    return edges, np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> ReliabilityBins:
    """Bin rows by top-label confidence into ``n_bins`` equal-width bins over [0, 1].

    Bin b holds confidences in ``(edges[b], edges[b+1]]``; a confidence of exactly 0 falls in
    the first bin.

    Args:
        probs: class probabilities (N, A).
        labels: true classes (N,).
        n_bins: number of bins (>= 1).

    Returns:
        The per-bin mean confidence, accuracy and count.

    Raises:
        ValueError: for mismatched shapes, empty input, out-of-range labels or ``n_bins < 1``.
    """
    p, y = _check(probs, labels)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = p.max(axis=1)  # (N,)
    correct = (p.argmax(axis=1) == y).astype(np.float64)  # (N,)
    edges, idx = _bin_index(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        mean_acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return ReliabilityBins(edges=edges, confidence=mean_conf, accuracy=mean_acc, count=count)


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of the top label: ``sum_b (n_b / N) |acc_b - conf_b|``.

    Args:
        probs: class probabilities (N, A).
        labels: true classes (N,).
        n_bins: number of equal-width confidence bins (15 in the router report).

    Returns:
        ECE in [0, 1].

    Raises:
        ValueError: for mismatched shapes, empty input, out-of-range labels or ``n_bins < 1``.
    """
    bins = reliability_bins(probs, labels, n_bins)
    filled = bins.count > 0
    gaps = np.abs(bins.accuracy[filled] - bins.confidence[filled])
    return float(np.sum(bins.count[filled] * gaps) / np.sum(bins.count))


def calibration_by_predicted_class(
    probs: np.ndarray,
    labels: np.ndarray,
    names: list[str] | None = None,
    sample_weight: np.ndarray | None = None,
) -> dict[str, dict[str, float | None]]:
    """Mean top-label confidence against accuracy among the rows predicted as each class.

    ECE pools every prediction; this splits it by the class the router chose, which shows
    *which* expert's routing confidence is off (e.g. "honesty" predictions right 90% of the
    time at a mean confidence of 0.85). A class predicted nowhere gets ``n = 0`` and Nones.

    Args:
        probs: class probabilities (N, A).
        labels: true classes (N,).
        names: one name per class (default "0", "1", ...).
        sample_weight: optional non-negative weight per row (N,) for the means, e.g. weights
            that give every true class the same total (what a class prior other than the
            set's own would see); ``n`` still counts rows.

    Returns:
        ``{name: {"n", "confidence", "accuracy", "gap"}}`` with gap = confidence - accuracy
        (> 0: over-confident); JSON-ready (None, not NaN, for an empty class).

    Raises:
        ValueError: for mismatched shapes, empty input, out-of-range labels, a wrong number
            of names, or weights of the wrong shape or sign.
    """
    p, y = _check(probs, labels)
    names = [str(i) for i in range(p.shape[1])] if names is None else list(names)
    if len(names) != p.shape[1]:
        raise ValueError(f"names has {len(names)} entries for {p.shape[1]} classes")
    w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if w.shape != y.shape or np.any(w < 0):
        raise ValueError(f"sample_weight must be ({len(y)},) non-negative weights, got shape "
                         f"{w.shape}")
    pred, conf = p.argmax(axis=1), p.max(axis=1)
    out: dict[str, dict[str, float | None]] = {}
    for a, name in enumerate(names):
        m = pred == a
        n = int(m.sum())
        if n == 0:
            out[name] = {"n": 0, "confidence": None, "accuracy": None, "gap": None}
            continue
        if w[m].sum() == 0:  # predicted, but only on rows of weight 0
            out[name] = {"n": n, "confidence": None, "accuracy": None, "gap": None}
            continue
        c = float(np.average(conf[m], weights=w[m]))
        acc = float(np.average(y[m] == a, weights=w[m]))
        out[name] = {"n": n, "confidence": c, "accuracy": acc, "gap": c - acc}
    return out


def _ece_rows(b: np.ndarray, conf: np.ndarray, correct: np.ndarray, n_bins: int) -> np.ndarray:
    """ECE of each of B row sets at once: bins, confidences, correctness (B, N) -> (B,)."""
    flat = b + n_bins * np.arange(b.shape[0])[:, None]  # one bin block per row set
    size = b.shape[0] * n_bins
    sum_conf = np.bincount(flat.ravel(), weights=conf.ravel(), minlength=size)
    sum_acc = np.bincount(flat.ravel(), weights=correct.ravel(), minlength=size)
    # sum_b |acc_b - conf_b| n_b / N == sum_b |sum_acc_b - sum_conf_b| / N
    return np.abs(sum_acc - sum_conf).reshape(b.shape[0], n_bins).sum(axis=1) / b.shape[1]


def _ece_resampled(conf: np.ndarray, correct: np.ndarray, idx: np.ndarray,
                   n_bins: int) -> np.ndarray:
    """ECE of each bootstrap resample: ``idx`` (B, N) row indices -> (B,) ECE values."""
    return _ece_rows(_bin_index(conf, n_bins)[1][idx], conf[idx], correct[idx], n_bins)


def ece_if_calibrated(probs: np.ndarray, n_bins: int = 15, n_sim: int = 2000,
                      seed: int = 0) -> dict[str, float]:
    """The ECE a perfectly calibrated system with these confidences would show on these rows.

    The binned ECE is biased upwards: with finitely many rows, each bin's accuracy scatters
    around its confidence even when the system is calibrated. This keeps every row's top-label
    confidence ``c``, draws "correct" with probability ``c`` (the calibrated hypothesis), and
    measures the ECE, ``n_sim`` times. A measured ECE above the ``p95`` is evidence of
    miscalibration; one below it cannot be told from sampling noise. No labels are needed.

    Args:
        probs: class probabilities (N, A).
        n_bins: equal-width confidence bins (15 in the router report).
        n_sim: simulated label draws (>= 100).
        seed: seed of the draws.

    Returns:
        ``{"mean", "p95"}`` of the simulated ECE.

    Raises:
        ValueError: for empty or non-2-D input, ``n_bins < 1`` or ``n_sim < 100``.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"probs must be a non-empty (N, A) array, got shape {p.shape}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if n_sim < 100:
        raise ValueError(f"n_sim must be >= 100 for a 95th percentile, got {n_sim}")
    conf = p.max(axis=1)  # (N,)
    bins = _bin_index(conf, n_bins)[1]  # (N,): the confidences, hence the bins, never change
    rng = np.random.default_rng(seed)
    sims = []
    for start in range(0, n_sim, 500):  # bound the (S, N) temporaries
        s = min(500, n_sim - start)
        correct = (rng.random((s, len(conf))) < conf).astype(np.float64)  # (S, N)
        sims.append(_ece_rows(np.broadcast_to(bins, correct.shape),
                              np.broadcast_to(conf, correct.shape), correct, n_bins))
    e = np.concatenate(sims)
    return {"mean": float(e.mean()), "p95": float(np.percentile(e, 95))}


def ece_gap_bootstrap(probs_a: np.ndarray, probs_b: np.ndarray, labels: np.ndarray,
                      n_bins: int = 15, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Paired bootstrap of ``ECE(a) - ECE(b)`` on the same rows (is ``a`` better calibrated?).

    Rows are resampled with replacement, the same rows for both systems, so the interval is
    about the difference, not each ECE on its own. ECE on ~1,000 rows has a sampling spread of
    about a point, the size of the gaps the router report compares.

    Args:
        probs_a: class probabilities of system a (N, A).
        probs_b: class probabilities of system b (N, A).
        labels: true classes (N,).
        n_bins: equal-width confidence bins (15 in the router report).
        n_boot: bootstrap resamples (>= 100).
        seed: resampling seed.

    Returns:
        ``{"ece_a", "ece_b", "diff", "ci95_low", "ci95_high", "p_a_lower"}``: the two ECEs and
        their difference on all rows, the 2.5/97.5 percentiles of the resampled difference, and
        the share of resamples where ``a`` has the lower ECE.

    Raises:
        ValueError: for mismatched shapes, empty input, out-of-range labels, ``n_bins < 1``
            or ``n_boot < 100``.
    """
    if np.shape(probs_a) != np.shape(probs_b):
        raise ValueError(f"probs_a and probs_b must have the same shape, got "
                         f"{np.shape(probs_a)} and {np.shape(probs_b)}")
    pa, y = _check(probs_a, labels)
    pb, _ = _check(probs_b, labels)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if n_boot < 100:
        raise ValueError(f"n_boot must be >= 100 for a 95% interval, got {n_boot}")
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n_boot, len(y)))  # (B, N)
    gaps = []
    for p in (pa, pb):
        conf = p.max(axis=1)
        correct = (p.argmax(axis=1) == y).astype(np.float64)
        gaps.append(_ece_resampled(conf, correct, idx, n_bins))
    d = gaps[0] - gaps[1]  # (B,)
    ea, eb = ece(pa, y, n_bins), ece(pb, y, n_bins)
    return {"ece_a": ea, "ece_b": eb, "diff": ea - eb,
            "ci95_low": float(np.percentile(d, 2.5)), "ci95_high": float(np.percentile(d, 97.5)),
            "p_a_lower": float(np.mean(d < 0))}


def selective_accuracy(probs: np.ndarray, labels: np.ndarray, coverage: float = 0.9) -> float:
    """Accuracy on the ``ceil(coverage * N)`` rows with the highest top-label confidence.

    Ties in confidence are broken by row order (stable sort), so the value is deterministic.

    Args:
        probs: class probabilities (N, A).
        labels: true classes (N,).
        coverage: share of rows kept, in (0, 1].

    Returns:
        Accuracy on the kept rows.

    Raises:
        ValueError: for mismatched shapes, empty input, out-of-range labels or a coverage
            outside (0, 1].
    """
    p, y = _check(probs, labels)
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    n_keep = int(np.ceil(coverage * len(y) - 1e-9))
    order = np.argsort(-p.max(axis=1), kind="stable")[:n_keep]  # most confident first
    return float(np.mean(p[order].argmax(axis=1) == y[order]))


def confident_errors(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.9,
                     among: int | None = None) -> float:
    """Share of rows routed to a wrong class with top-label confidence >= ``threshold``.

    A confident misroute is the failure METHOD.md calls Axis Collapse: the router sends a
    request to the wrong expert and says it is sure. ``threshold=0`` gives the error rate.

    Args:
        probs: class probabilities (N, A).
        labels: true classes (N,).
        threshold: confidence at or above which an error counts, in [0, 1].
        among: only rows whose true class is this one (e.g. harmful prompts); ``None`` = all.

    Returns:
        The share, over the rows considered; 0.0 when ``among`` selects no row.

    Raises:
        ValueError: for mismatched shapes, empty input, out-of-range labels, a threshold
            outside [0, 1] or an ``among`` outside [0, A).
    """
    p, y = _check(probs, labels)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if among is not None and not 0 <= among < p.shape[1]:
        raise ValueError(f"among must be a class in [0, {p.shape[1]}), got {among}")
    keep = np.ones(len(y), bool) if among is None else y == among  # (N,)
    if not keep.any():
        return 0.0
    wrong = (p.argmax(axis=1) != y) & (p.max(axis=1) >= threshold)  # (N,)
    return float(wrong[keep].mean())


def scores(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, float]:
    """One ablation row of the router report: every routing metric above on ``probs`` (N, A).

    Returns:
        ``{accuracy, macro_f1, nll, ece, brier, selective_accuracy_90, confident_errors_90}``
        (ECE with ``n_bins`` equal-width bins).
    """
    return {
        "accuracy": accuracy(probs, labels),
        "macro_f1": macro_f1(probs, labels),
        "nll": nll(probs, labels),
        "ece": ece(probs, labels, n_bins),
        "brier": brier(probs, labels),
        "selective_accuracy_90": selective_accuracy(probs, labels, 0.9),
        "confident_errors_90": confident_errors(probs, labels, 0.9),
    }


def auroc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count half.

    Used for OOD detection: positives are out-of-distribution prompts, the score is the
    router's OOD score (higher = more out of distribution).

    Args:
        scores_pos: scores of the positive rows (P,).
        scores_neg: scores of the negative rows (Q,).

    Returns:
        AUROC in [0, 1] (0.5 = chance).

    Raises:
        ValueError: if either set is empty or not one-dimensional.
    """
    pos = np.asarray(scores_pos, dtype=np.float64)
    neg = np.asarray(scores_neg, dtype=np.float64)
    for name, arr in (("scores_pos", pos), ("scores_neg", neg)):
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    # rank-sum (Mann-Whitney U) with mid-ranks for ties: O((P+Q) log(P+Q))
    allv = np.concatenate([pos, neg])  # (P+Q,)
    _, inverse, counts = np.unique(allv, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mid-rank of each distinct value
    ranks = mid_rank[inverse]  # (P+Q,)
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))
