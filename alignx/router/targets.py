"""Stage 2 (MoCaE router, calibration data): intent targets for the router.

The dataset a prompt comes from is only a noisy label for the expert that should answer it
(METHOD.md Stage 2 step 3): many HH-RLHF "harmless" prompts are benign questions, and some
Alpaca instructions are misconception-prone questions. The router's targets are what each
expert is for: harmful intent -> harmlessness, misconception-prone questions -> honesty,
other tasks -> helpfulness.

:func:`build_intent_targets` turns dataset-of-origin labels into intent targets by label
propagation (Zhou et al., 2004, "Learning with local and global consistency") over a
k-nearest-neighbour cosine graph of the prompts' features plus a small hand-labelled seed set
(``router.seed_sets``: ``alignx/router/intent_seeds.jsonl``, ``intent_seeds_2.jsonl``, the
second seed set written against style-driven routing, ``intent_seeds_3.jsonl``, boundary cases
(false premises inside ordinary tasks, harmful asks phrased as chores, benign requests that look
alarming), and retired frozen sets: by default the second and the fifth to eighth).
The origin label enters as a weak prior, the seeds as strong labels, and a prompt may only move
along the allowed transitions (TruthfulQA questions stay honesty, by construction of that
dataset). The evaluation sets
(:data:`EVALUATION_SETS`: the held-out intent validation prompts and the frozen intent sets) are
never used here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from alignx.axes import AXES, Axis, parse_axis

__all__ = [
    "DEFAULT_TRANSITIONS",
    "IntentTargets",
    "MarginChoice",
    "RELABEL_MARGINS",
    "choose_relabel_margin",
    "build_intent_targets",
    "read_intent_prompts",
    "read_seed_sets",
    "prompt_key",
    "refuse_shared_prompt",
    "EVALUATION_SETS",
    "RETIRED_EVALUATION_SETS",
    "REPORTABLE_SETS",
    "evaluation_set_key",
    "SHIPPED_SEED_SETS",
]

logger = logging.getLogger(__name__)

#: hand-labelled files shipped in this package for training or calibration
#: (``router.seed_sets`` / ``router.calibration_sets`` pick among them): the three seed sets
#: (the third: boundary cases, ``docs/experiments/seeds_boundary_protocol.md``), and
#: the frozen intent sets 2 to 8, retired from evaluation once scored: 2 to 4 by
#: ``docs/experiments/shift_calibration_protocol.md`` and ``seeds_4_protocol.md``, 5 to 8 when
#: the default router began training on them (``docs/experiments/wise_2_protocol.md``)
SHIPPED_SEED_SETS: tuple[str, ...] = ("intent_seeds.jsonl", "intent_seeds_2.jsonl",
                                      "intent_seeds_3.jsonl", "intent_set_2.jsonl",
                                      "intent_set_3.jsonl", "intent_set_4.jsonl",
                                      "intent_set_5.jsonl", "intent_set_6.jsonl",
                                      "intent_set_7.jsonl", "intent_set_8.jsonl")

#: hand-labelled evaluation sets shipped in this package, never trained or calibrated on:
#: report key -> (file, title). ``intent_validation`` is held-out validation data (20% of the
#: second seed set's writing, for choices); the frozen intent sets are test sets, reported once.
EVALUATION_SETS: dict[str, tuple[str, str]] = {
    "intent_validation": ("intent_validation.jsonl", "held-out intent validation prompts "
                          "(validation: for choices)"),
    "intent_set": ("intent_set.jsonl", "frozen intent set (hand-labelled)"),
    "intent_set_9": ("intent_set_9.jsonl", "ninth frozen intent set (hand-labelled, blind "
                     "double-labelled; writers and themes unseen by any router)"),
    "intent_set_10": ("intent_set_10.jsonl", "tenth frozen intent set (hand-labelled, blind "
                      "double-labelled; writers and themes unseen by any router)"),
    "intent_set_11": ("intent_set_11.jsonl", "eleventh frozen intent set (hand-labelled, blind "
                      "double-labelled; writers and themes unseen by any router)"),
    "intent_set_12": ("intent_set_12.jsonl", "twelfth frozen intent set (hand-labelled, blind "
                      "double-labelled; writers and themes unseen by any router)"),
    "intent_set_13": ("intent_set_13.jsonl", "thirteenth frozen intent set (hand-labelled, blind "
                      "double-labelled; writers and themes unseen by any router)"),
}

#: frozen intent sets retired from evaluation into default seed files (report key -> (file,
#: title)): a router that was not trained on them may still report them when
#: ``router.evaluation_sets`` names them, as every router calibrated before the switch did
RETIRED_EVALUATION_SETS: dict[str, tuple[str, str]] = {
    f"intent_set_{n}": (f"intent_set_{n}.jsonl", f"{nth} frozen intent set (hand-labelled, "
                        "blind double-labelled; retired from evaluation: a default seed file "
                        "since docs/experiments/wise_2_protocol.md)")
    for n, nth in ((5, "fifth"), (6, "sixth"), (7, "seventh"), (8, "eighth"))}

#: every shipped set a calibration report may hold: report key -> (file, title)
REPORTABLE_SETS: dict[str, tuple[str, str]] = {**EVALUATION_SETS, **RETIRED_EVALUATION_SETS}


def evaluation_set_key(name: str) -> str:
    """The report key of an evaluation set (``router.evaluation_sets``): a shipped file's key in
    :data:`EVALUATION_SETS` or :data:`RETIRED_EVALUATION_SETS`, else the stem of the user's own
    file."""
    for key, (fname, _) in REPORTABLE_SETS.items():
        if name == fname:
            return key
    return Path(name).stem


#: Which intent a prompt of each origin may be relabelled to (the origin itself always allowed).
#: Alpaca (helpfulness) and HH-RLHF (harmlessness) prompts may move to any intent; TruthfulQA
#: questions were written to tempt a false answer, so they stay honesty.
DEFAULT_TRANSITIONS: Mapping[Axis, tuple[Axis, ...]] = {
    Axis.HELPFULNESS: (Axis.HELPFULNESS, Axis.HARMLESSNESS, Axis.HONESTY),
    Axis.HARMLESSNESS: (Axis.HARMLESSNESS, Axis.HELPFULNESS, Axis.HONESTY),
    Axis.HONESTY: (Axis.HONESTY,),
}


@dataclass(frozen=True)
class IntentTargets:
    """Result of :func:`build_intent_targets` for N prompts.

    Attributes:
        labels: intent target per prompt (N,), an index into ``axes``.
        scores: propagated label distribution per prompt (N, A); rows sum to 1.
        changed: whether the target differs from the origin label (N,).
    """

    labels: np.ndarray
    scores: np.ndarray
    changed: np.ndarray
    #: the allowed axis with the most propagated mass per prompt (N,), and by how much its
    #: share beats the origin axis's (N,); ``labels`` moves a prompt to ``best`` when
    #: ``gain > margin``
    best: np.ndarray
    gain: np.ndarray

    def transitions(self, origin: np.ndarray) -> np.ndarray:
        """Counts (A, A): row = origin axis, column = target axis."""
        n_ax = self.scores.shape[1]
        flat = np.asarray(origin) * n_ax + self.labels
        return np.bincount(flat, minlength=n_ax * n_ax).reshape(n_ax, n_ax)

    def at_margin(self, origin: np.ndarray, margin: float) -> IntentTargets:
        """The same propagation decided at another ``margin`` (no new propagation)."""
        return _decide(np.asarray(origin), self.scores, self.best, self.gain, margin)


def _decide(origin: np.ndarray, scores: np.ndarray, best: np.ndarray, gain: np.ndarray,
            margin: float) -> IntentTargets:
    """A prompt moves from its origin to ``best`` when ``gain > margin``."""
    labels = np.where(gain > margin, best, origin)
    return IntentTargets(labels=labels, scores=scores, changed=labels != origin, best=best,
                         gain=gain)


def read_intent_prompts(
    path: str | Path | None = None, name: str = "intent_seeds.jsonl"
) -> tuple[list[str], list[Axis]]:
    """Read a hand-labelled prompt file (``{"prompt", "axis", "note"}`` per line).

    Args:
        path: a JSON Lines file; None reads ``name`` shipped in this package.
        name: a shipped seed file (:data:`SHIPPED_SEED_SETS`) or evaluation set (the files of
            :data:`EVALUATION_SETS`).

    Returns:
        ``(prompts, axes)``.

    Raises:
        ValueError: for a line without ``prompt``/``axis``, an unknown axis, or an empty file.
    """
    if path is None:
        text = resources.files("alignx.router").joinpath(name).read_text(encoding="utf-8")
        source = name
    else:
        text = Path(path).read_text(encoding="utf-8")
        source = str(path)
    prompts: list[str] = []
    axes: list[Axis] = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "prompt" not in row or "axis" not in row:
            raise ValueError(f"{source}:{i}: each line needs 'prompt' and 'axis', got {list(row)}")
        prompts.append(str(row["prompt"]))
        axes.append(parse_axis(row["axis"]))
    if not prompts:
        raise ValueError(f"{source} holds no prompts")
    return prompts, axes


def read_seed_sets(names: Sequence[str]) -> tuple[list[str], list[Axis]]:
    """The seeds of every file in ``names`` (shipped names or paths), concatenated in order.

    Raises:
        ValueError: a file's bad line, or a prompt that two of the files share.
    """
    prompts: list[str] = []
    axes: list[Axis] = []
    for name in names:
        p, a = (read_intent_prompts(name=name) if name in SHIPPED_SEED_SETS
                else read_intent_prompts(path=name))
        prompts += p
        axes += a
    refuse_shared_prompt(prompts, names)
    return prompts, axes


def prompt_key(prompt: str) -> str:
    """A prompt up to case and white space: what makes two hand-labelled prompts the same."""
    return " ".join(prompt.lower().split())


def refuse_shared_prompt(prompts: Sequence[str], names: Sequence[str]) -> None:
    """Raise ValueError if two of ``prompts`` (read from the files ``names``) are the same
    prompt up to case and white space."""
    seen: set[str] = set()
    for p in prompts:
        key = prompt_key(p)
        if key in seen:
            raise ValueError(f"the seed files {list(names)} hold one prompt twice: {p!r}")
        seen.add(key)


def _knn_graph(
    x: np.ndarray, k: int, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric kNN graph on unit-normalised rows: edge lists (rows, cols, weights).

    Edge weight = max(cosine, 0); an edge kept by either endpoint is kept (max of the two).
    """
    n = x.shape[0]
    k = min(k, n - 1)
    rows, cols, vals = [], [], []
    for start in range(0, n, chunk):
        sim = x[start : start + chunk] @ x.T  # (B, n)
        b = np.arange(sim.shape[0])
        sim[b, start + b] = -np.inf  # no self loops
        nb = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # (B, k)
        rows.append(np.repeat(start + b, k))
        cols.append(nb.ravel())
        vals.append(np.maximum(np.take_along_axis(sim, nb, axis=1).ravel(), 0.0))
    r = np.concatenate(rows + cols)
    c = np.concatenate(cols + rows)
    v = np.concatenate(vals + vals)
    # dedupe (i, j) pairs, keeping the max weight
    key = r.astype(np.int64) * n + c
    order = np.lexsort((-v, key))
    key, v = key[order], v[order]
    first = np.r_[True, key[1:] != key[:-1]]
    key, v = key[first], v[first]
    return key // n, key % n, v


def build_intent_targets(
    h: np.ndarray,
    origin: Sequence[int | str | Axis] | np.ndarray,
    h_seed: np.ndarray,
    y_seed: Sequence[int | str | Axis] | np.ndarray,
    *,
    n_neighbors: int = 10,
    alpha: float = 0.9,
    origin_weight: float = 0.03,
    seed_weight: float = 1.0,
    margin: float = 0.0,
    n_iter: int = 50,
    class_mass_normalize: bool = False,
    transitions: Mapping[Axis, Sequence[Axis]] = DEFAULT_TRANSITIONS,
    axes: Sequence[Axis] = AXES,
) -> IntentTargets:
    """Relabel prompts from dataset-of-origin labels to intent targets by label propagation.

    Nodes are the N prompts and the S seeds; edges join each node to its ``n_neighbors``
    nearest neighbours by cosine similarity (symmetrised, normalised as D^-1/2 W D^-1/2).
    Label mass starts at ``origin_weight`` on each prompt's origin axis and ``seed_weight`` on
    each seed's axis, and spreads as ``F <- alpha S F + (1 - alpha) Y``. A prompt takes the
    allowed axis with the most mass if it beats the origin axis by more than ``margin``
    (mass shares of the row), else it keeps its origin.

    Args:
        h: prompt features (N, d) (any scale; rows are normalised here).
        origin: dataset-of-origin axis per prompt (N,), ints into ``axes`` or axis names.
        h_seed: hand-labelled seed features (S, d).
        y_seed: seed intents (S,).
        n_neighbors: k of the kNN graph.
        alpha: propagation strength in (0, 1); 1 - alpha is the pull back to the prior.
        origin_weight: prior mass of a prompt's origin label (seeds count ``seed_weight``).
        seed_weight: prior mass of a seed's label.
        margin: minimum share by which the new axis must beat the origin axis.
        n_iter: propagation iterations (the error shrinks like alpha^n_iter).
        class_mass_normalize: divide each axis's propagated mass by its prior mass (Zhu et
            al., 2003), so that a source with many prompts (Alpaca) does not flood its
            neighbours just by its size.
        transitions: allowed origin -> target moves.
        axes: axis order of the integer labels.

    Returns:
        The :class:`IntentTargets`.

    Raises:
        ValueError: for empty inputs, mismatched shapes, a feature-dimension mismatch,
            out-of-range parameters, or seeds that do not cover every axis.
    """
    axes = tuple(parse_axis(a) for a in axes)
    n_ax = len(axes)
    x = np.asarray(h, dtype=np.float32)
    xs = np.asarray(h_seed, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"h must be a non-empty (N, d) array, got shape {x.shape}")
    if xs.ndim != 2 or xs.shape[0] == 0:
        raise ValueError(f"h_seed must be a non-empty (S, d) array, got shape {xs.shape}")
    if xs.shape[1] != x.shape[1]:
        raise ValueError(f"h_seed has dimension {xs.shape[1]}, h has {x.shape[1]}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be >= 1, got {n_neighbors}")
    if origin_weight < 0 or seed_weight <= 0:
        raise ValueError(
            f"origin_weight must be >= 0 and seed_weight > 0, got {origin_weight}, {seed_weight}"
        )

    def as_idx(v: Sequence[int | str | Axis] | np.ndarray, name: str, n: int) -> np.ndarray:
        arr = np.asarray(v)
        if arr.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            arr = np.array([axes.index(parse_axis(a)) for a in arr], dtype=np.int64)
        if arr.min() < 0 or arr.max() >= n_ax:
            raise ValueError(f"{name} holds axis indices outside [0, {n_ax})")
        return arr.astype(np.int64)

    y_o = as_idx(origin, "origin", x.shape[0])
    y_s = as_idx(y_seed, "y_seed", xs.shape[0])
    missing = [axes[a].value for a in range(n_ax) if not np.any(y_s == a)]
    if missing:
        raise ValueError(f"y_seed has no seed for axis {', '.join(missing)}")

    # graph over prompts + seeds, on the unit sphere (cosine similarity)
    allx = np.concatenate([x, xs])  # (N + S, d)
    allx /= np.maximum(np.linalg.norm(allx, axis=1, keepdims=True), 1e-12)
    n_all = allx.shape[0]
    r, c, w = _knn_graph(allx, n_neighbors)
    deg = np.bincount(r, weights=w, minlength=n_all)  # (N + S,)
    deg[deg == 0] = 1.0
    w_norm = w / np.sqrt(deg[r] * deg[c])  # D^-1/2 W D^-1/2

    y0 = np.zeros((n_all, n_ax))  # (N + S, A) prior label mass
    y0[np.arange(x.shape[0]), y_o] = origin_weight
    y0[x.shape[0] + np.arange(xs.shape[0]), y_s] = seed_weight
    f = y0.copy()
    for _ in range(n_iter):  # F <- alpha S F + (1 - alpha) Y
        sf = np.stack(
            [np.bincount(r, weights=w_norm * f[c, j], minlength=n_all) for j in range(n_ax)],
            axis=1,
        )
        f = alpha * sf + (1.0 - alpha) * y0
    scores = f[: x.shape[0]]
    if class_mass_normalize:
        scores = scores / np.maximum(y0.sum(axis=0), 1e-12)  # (N, A) / (A,)
    scores = scores / np.maximum(scores.sum(axis=1, keepdims=True), 1e-12)  # (N, A)

    # the allowed axis with the most mass wins if it beats the origin by `margin`
    # (transitions name all three axes; a run on a subset of them uses the part inside it)
    allowed = np.eye(n_ax, dtype=bool)  # [origin, target]; staying is always allowed
    for o_axis, targets in transitions.items():
        o_ax = parse_axis(o_axis)
        if o_ax not in axes:
            continue
        for t_ax in (parse_axis(t) for t in targets):
            if t_ax in axes:
                allowed[axes.index(o_ax), axes.index(t_ax)] = True
    masked = np.where(allowed[y_o], scores, -np.inf)  # (N, A)
    best = masked.argmax(axis=1)
    gain = scores[np.arange(len(y_o)), best] - scores[np.arange(len(y_o)), y_o]
    result = _decide(y_o, scores, best, gain, margin)
    logger.info(
        "intent targets: %d of %d prompts relabelled; transitions (origin x target)\n%s",
        int(result.changed.sum()),
        len(result.labels),
        result.transitions(y_o),
    )
    return result


#: relabelling margins :func:`choose_relabel_margin` tries by default (1.0 never relabels)
RELABEL_MARGINS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


@dataclass(frozen=True)
class MarginChoice:
    """Result of :func:`choose_relabel_margin`.

    Attributes:
        margin: the chosen margin.
        rows: one dict per tried margin: ``margin``, ``seed_cv_accuracy`` (held-out seeds,
            intent labels), ``origin_val_accuracy`` (validation prompts, origin labels),
            ``score`` (their mean) and ``moved`` (share of train + validation prompts
            relabelled, averaged over folds).
    """

    margin: float
    rows: list[dict[str, float]]


def choose_relabel_margin(
    h_tr: np.ndarray,
    y_tr: np.ndarray,
    h_va: np.ndarray,
    y_va: np.ndarray,
    h_seed: np.ndarray,
    y_seed: np.ndarray,
    fit: Callable[[np.ndarray, np.ndarray, np.ndarray], Callable[[np.ndarray], np.ndarray]],
    *,
    margins: Sequence[float] = RELABEL_MARGINS,
    seed_weight: float = 1.0,
    folds: int = 5,
    seed: int = 0,
    axes: Sequence[Axis] = AXES,
    **propagation: Any,
) -> MarginChoice:
    """Choose how readily prompts leave their origin label, on validation data only.

    The margin trades the two things a router is scored on: a small margin follows the seeds
    (intent) further, a large one keeps the dataset-of-origin labels. Each margin is scored by
    ``folds``-fold cross-validation over the seeds: the seeds of one fold are left out of the
    propagation and of the router's training data, and the router (``fit`` on the train
    prompts' targets + the other seeds at ``seed_weight``) is scored on

    - the left-out seeds against their intent labels (``seed_cv_accuracy``), and
    - the validation prompts against their origin labels (``origin_val_accuracy``);

    the chosen margin has the highest mean of the two (ties: the smaller margin). Neither the
    test split nor the frozen intent set is touched.

    Args:
        h_tr, y_tr: train prompt features (N, d) and origin labels (N,).
        h_va, y_va: validation prompt features (V, d) and origin labels (V,).
        h_seed, y_seed: seed features (S, d) and intents (S,).
        fit: ``fit(h, y, sample_weight) -> predict``, ``predict(h) -> probs (n, A)``.
        margins: the margins to try (each in [0, 1]).
        seed_weight: weight of a seed in ``fit``.
        folds: seed folds (stratified by intent; at least 2).
        seed: fold shuffling seed.
        axes: axis order of the integer labels.
        **propagation: passed to :func:`build_intent_targets` (not ``margin``).

    Returns:
        The :class:`MarginChoice`.

    Raises:
        ValueError: an empty margin list, a margin outside [0, 1], fewer than 2 folds, or
            fewer seeds of some intent than folds.
    """
    if not margins or any(not 0.0 <= m <= 1.0 for m in margins):
        raise ValueError(f"margins must be a non-empty list of values in [0, 1], got {margins}")
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    y_seed = np.asarray(y_seed)
    counts = np.bincount(y_seed, minlength=len(axes))
    if counts.min() < folds:
        raise ValueError(f"every intent needs >= {folds} seeds for {folds}-fold selection, "
                         f"got {dict(zip([a.value for a in axes], counts.tolist(), strict=True))}")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(y_seed), dtype=np.int64)
    for a in range(len(axes)):  # stratified: each fold gets its share of every intent
        idx = rng.permutation(np.flatnonzero(y_seed == a))
        fold_of[idx] = np.arange(len(idx)) % folds
    h_all = np.concatenate([h_tr, h_va])
    y_all = np.concatenate([y_tr, y_va])
    n_tr = len(y_tr)
    sums = {m: np.zeros(3) for m in margins}  # seed_cv, origin_val, moved
    for k in range(folds):
        keep, out = fold_of != k, fold_of == k
        base = build_intent_targets(h_all, y_all, h_seed[keep], y_seed[keep], axes=axes,
                                    margin=0.0, **propagation)
        h_fit = np.concatenate([h_tr, h_seed[keep]])  # the same rows for every margin
        w = np.concatenate([np.ones(n_tr), np.full(int(keep.sum()), seed_weight)])
        for m in margins:
            it = base.at_margin(y_all, m)
            predict = fit(h_fit, np.concatenate([it.labels[:n_tr], y_seed[keep]]), w)
            sums[m] += (
                float((predict(h_seed[out]).argmax(1) == y_seed[out]).mean()),
                float((predict(h_va).argmax(1) == y_va).mean()),
                float(it.changed.mean()),
            )
    rows = []
    for m in margins:
        cv, val, moved = sums[m] / folds
        rows.append({"margin": float(m), "seed_cv_accuracy": cv, "origin_val_accuracy": val,
                     "score": (cv + val) / 2, "moved": moved})
        logger.info("relabel margin %.2f: seed CV acc %.3f, origin val acc %.3f, moved %.3f",
                    m, cv, val, moved)
    best = max(rows, key=lambda r: (r["score"], -r["margin"]))
    return MarginChoice(margin=best["margin"], rows=rows)
