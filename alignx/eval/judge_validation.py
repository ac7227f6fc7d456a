"""Evaluation: how far each judge can be trusted, measured on labelled data it never saw.

Place in the pipeline: after :func:`alignx.eval.judges.build_judges` and before any system is
scored, the harness runs these checks and prints their figures next to the scores the
judges produce (issue 5: "each offline judge is validated and its validity reported").

- :func:`validate_safety_judge`: (1) pairwise accuracy on held-out HH-RLHF harmless
  preference pairs (the ``chosen`` reply should get a lower harm score than the
  ``rejected`` one; ties count half) and (2) accuracy and AUROC on
  ``alignx/eval/safety_validation.jsonl``: 74 hand-written answers to risky prompts (26
  clearly unsafe compliances described in vague terms, 24 refusals, 24 helpful-but-safe
  answers), which no judge here is trained on.
- :func:`validate_truth_judge`: accuracy at telling TruthfulQA's correct reference answers
  from its incorrect ones: each reference answer is judged against the *other* references
  of its question (leave-one-out) and classified truthful or not.

Limits of these checks (stated in every report via :data:`JUDGE_LIMITS`):

- HH-RLHF ``chosen`` replies are only the *less harmful* of two (many still go along with
  the request), so pairwise accuracy measures ranking, not an absolute safe/unsafe line;
  annotators also disagree with each other on a sizeable share of these pairs, which caps
  what any judge can reach.
- The hand-written set is small (74 answers, one author), written in clear-cut terms: it
  catches gross failures (a judge that flags refusals, or misses blatant compliance) but
  says little about subtle or borderline answers; its CI is wide.
- TruthfulQA references are short, parallel sentences; a model's free-form answer is longer
  and noisier, so the truth judge's accuracy on references is an upper bound of its
  accuracy on generations. "I have no comment"-style references are truthful by rule.
- Informativeness is a rule (not a refusal / non-answer); it is not validated here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alignx.eval.judge_data import (
    SAFETY_VALIDATION_PATH,
    read_hh_harmless_pairs,
    read_safety_validation_set,
    read_truthfulqa,
)
from alignx.eval.metrics import auroc, bootstrap_ci
from alignx.eval.offline_judges import is_non_answer
from alignx.eval.records import SafetyItem, SafetyJudge, TruthItem, TruthJudge

logger = logging.getLogger(__name__)

JUDGE_LIMITS: dict[str, str] = {
    "safety": (
        "HH-RLHF 'chosen' replies are only the less harmful of two (and often evasive), so HH "
        "pairwise accuracy measures ranking, not an absolute safe/unsafe line, and a judge "
        "fitted on them may flag helpful answers to risky prompts; the hand-labelled set is "
        "small (74 clear-cut answers by one author) and says little about borderline answers."
    ),
    "truthfulness": (
        "validated on TruthfulQA's short reference answers (leave-one-out), an upper bound for "
        "free-form generations; embeddings track topic and wording more than factual polarity; "
        "non-answers are truthful by rule; informativeness is a refusal rule, not validated."
    ),
}


@dataclass(frozen=True)
class SafetyValidity:
    """Validity figures of a safety judge (all in percent).

    Attributes:
        judge_id: the judge validated.
        hh_split: HH-RLHF harmless split used.
        hh_pairs: usable pairs in it.
        hh_pairwise_accuracy: share of pairs where ``chosen`` scored less harmful (ties half).
        hh_pairwise_ci: 95% bootstrap CI of that accuracy.
        labelled_n: answers in the hand-labelled set.
        labelled_accuracy: share whose ``unsafe`` flag matches the label.
        labelled_accuracy_ci: 95% bootstrap CI.
        labelled_auroc: AUROC of ``score`` for unsafe vs safe.
        labelled_accuracy_by_kind: accuracy per kind (harmful_compliance, refusal, helpful_safe).
        refusal_detection: share of the set's refusals flagged ``refusal``.
        limits: what these figures cannot show.
    """

    judge_id: str
    hh_split: str
    hh_pairs: int
    hh_pairwise_accuracy: float
    hh_pairwise_ci: tuple[float, float]
    labelled_n: int
    labelled_accuracy: float
    labelled_accuracy_ci: tuple[float, float]
    labelled_auroc: float
    labelled_accuracy_by_kind: dict[str, float] = field(default_factory=dict)
    refusal_detection: float = float("nan")
    limits: str = JUDGE_LIMITS["safety"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TruthValidity:
    """Validity figures of a truthfulness judge (all in percent).

    Attributes:
        judge_id: the judge validated.
        split: TruthfulQA split used.
        questions: questions used.
        answers: reference answers classified (those with a leave-one-out reference set).
        accuracy: share classified correctly (true refs truthful, false refs not).
        accuracy_ci: 95% bootstrap CI (resampling answers).
        balanced_accuracy: mean of the accuracies on true and on false references.
        accuracy_true_refs: share of true references judged truthful.
        accuracy_false_refs: share of false references judged untruthful.
        auroc: AUROC of ``score`` for true vs false references.
        non_answer_refs: references that are non-answers ("I have no comment"), truthful by rule.
        accuracy_without_non_answers: accuracy when those are left out.
        limits: what these figures cannot show.
    """

    judge_id: str
    split: str
    questions: int
    answers: int
    accuracy: float
    accuracy_ci: tuple[float, float]
    balanced_accuracy: float
    accuracy_true_refs: float
    accuracy_false_refs: float
    auroc: float
    non_answer_refs: int
    accuracy_without_non_answers: float
    limits: str = JUDGE_LIMITS["truthfulness"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _pct_ci(values: np.ndarray, seed: int) -> tuple[float, float]:
    ci = bootstrap_ci(values, lambda v: 100.0 * float(np.mean(v)), seed=seed)
    return (round(ci.low, 2), round(ci.high, 2))


def validate_safety_judge(
    judge: SafetyJudge,
    data_dir: str | Path,
    split: str = "test",
    labelled_path: str | Path = SAFETY_VALIDATION_PATH,
    max_pairs: int | None = None,
    seed: int = 0,
) -> SafetyValidity:
    """Measure a safety judge on held-out HH-RLHF pairs and on the hand-labelled answers.

    Args:
        judge: any :class:`~alignx.eval.records.SafetyJudge`.
        data_dir: data root with ``hh_rlhf_harmless/<split>.jsonl``.
        split: held-out split (``validation`` while choosing designs, ``test`` to report;
            never ``train``, which the offline judge is fitted on).
        labelled_path: hand-labelled answers (JSON Lines with prompt/answer/label/kind).
        max_pairs: use only the first ``max_pairs`` pairs (quick checks).
        seed: bootstrap seed.

    Returns:
        The :class:`SafetyValidity` figures.

    Raises:
        ValueError: ``split == "train"``.
        FileNotFoundError: a data file is missing.
    """
    if split == "train":
        raise ValueError("validate on a held-out split ('validation' or 'test'), not 'train'")
    pairs = read_hh_harmless_pairs(data_dir, split)[:max_pairs]
    items = [SafetyItem(p.prompt, a) for p in pairs for a in (p.chosen, p.rejected)]
    v = judge.judge_safety(items)
    s = np.array([x.score for x in v]).reshape(len(pairs), 2)  # (P, [chosen, rejected])
    pair_ok = (s[:, 1] > s[:, 0]).astype(float) + 0.5 * (s[:, 1] == s[:, 0])

    rows = read_safety_validation_set(labelled_path)
    lv = judge.judge_safety([SafetyItem(r.prompt, r.answer) for r in rows])
    gold = np.array([r.unsafe for r in rows])
    pred = np.array([x.unsafe for x in lv])
    ok = (gold == pred).astype(float)
    kinds = sorted({r.kind for r in rows})
    by_kind = {
        k: round(
            100.0 * float(np.mean([o for o, r in zip(ok, rows, strict=True) if r.kind == k])), 2
        )
        for k in kinds
    }
    refusals = [x.refusal for x, r in zip(lv, rows, strict=True) if r.kind == "refusal"]
    out = SafetyValidity(
        judge_id=judge.judge_id,
        hh_split=split,
        hh_pairs=len(pairs),
        hh_pairwise_accuracy=round(100.0 * float(pair_ok.mean()), 2),
        hh_pairwise_ci=_pct_ci(pair_ok, seed),
        labelled_n=len(rows),
        labelled_accuracy=round(100.0 * float(ok.mean()), 2),
        labelled_accuracy_ci=_pct_ci(ok, seed),
        labelled_auroc=round(auroc([x.score for x in lv], gold.astype(int)), 2),
        labelled_accuracy_by_kind=by_kind,
        refusal_detection=round(100.0 * float(np.mean(refusals)), 2) if refusals else float("nan"),
    )
    logger.info("safety judge validity: %s", out)
    return out


def leave_one_out_items(
    question: str, correct: Sequence[str], incorrect: Sequence[str]
) -> list[tuple[TruthItem, bool]]:
    """One item per reference answer, judged against the question's *other* references.

    Args:
        question: the question.
        correct: its true reference answers.
        incorrect: its false reference answers.

    Returns:
        ``(item, is_true_reference)`` pairs; a reference whose own list would be left empty
        is skipped (the judge needs both lists).
    """
    correct = list(dict.fromkeys(correct))
    incorrect = list(dict.fromkeys(incorrect))
    out = []
    for ref in correct:
        rest = [c for c in correct if c != ref]
        if rest and incorrect:
            out.append((TruthItem(question, ref, rest, incorrect), True))
    for ref in incorrect:
        rest = [c for c in incorrect if c != ref]
        if rest and correct:
            out.append((TruthItem(question, ref, correct, rest), False))
    return out


def validate_truth_judge(
    judge: TruthJudge,
    data_dir: str | Path,
    split: str = "test",
    max_questions: int | None = None,
    seed: int = 0,
) -> TruthValidity:
    """Measure a truth judge at telling TruthfulQA's true references from its false ones.

    Args:
        judge: any :class:`~alignx.eval.records.TruthJudge`.
        data_dir: data root with ``truthfulqa/<split>.jsonl``.
        split: ``validation`` while choosing designs, ``test`` to report.
        max_questions: use only the first ``max_questions`` questions (quick checks).
        seed: bootstrap seed.

    Returns:
        The :class:`TruthValidity` figures.

    Raises:
        FileNotFoundError: the split file is missing.
        ValueError: no question yields a leave-one-out item.
    """
    qs = read_truthfulqa(data_dir, split)[:max_questions]
    pairs = [p for q in qs for p in leave_one_out_items(q.question, q.correct, q.incorrect)]
    if not pairs:
        raise ValueError(f"truthfulqa/{split}: no question has enough reference answers")
    if all(g for _, g in pairs) or not any(g for _, g in pairs):
        raise ValueError(f"truthfulqa/{split}: the leave-one-out items are all "
                         f"{'true' if pairs[0][1] else 'false'} references; validity needs both "
                         "(questions with two or more correct and two or more incorrect answers)")
    verdicts = judge.judge_truthful([it for it, _ in pairs])
    gold = np.array([g for _, g in pairs])
    pred = np.array([v.truthful for v in verdicts])
    ok = (gold == pred).astype(float)
    non = np.array([is_non_answer(it.answer) for it, _ in pairs])
    out = TruthValidity(
        judge_id=judge.judge_id,
        split=split,
        questions=len(qs),
        answers=len(pairs),
        accuracy=round(100.0 * float(ok.mean()), 2),
        accuracy_ci=_pct_ci(ok, seed),
        balanced_accuracy=round(50.0 * float(ok[gold].mean() + ok[~gold].mean()), 2),
        accuracy_true_refs=round(100.0 * float(ok[gold].mean()), 2),
        accuracy_false_refs=round(100.0 * float(ok[~gold].mean()), 2),
        auroc=round(auroc([v.score for v in verdicts], gold.astype(int)), 2),
        non_answer_refs=int(non.sum()),
        accuracy_without_non_answers=round(100.0 * float(ok[~non].mean()), 2),
    )
    logger.info("truth judge validity: %s", out)
    return out


def validate_judges(
    safety_judge: SafetyJudge, truth_judge: TruthJudge, data_dir: str | Path, split: str = "test"
) -> dict[str, dict[str, Any]]:
    """Both validity checks, as a JSON-ready dict for ``report.json``.

    Args:
        safety_judge: the harmlessness judge.
        truth_judge: the honesty judge.
        data_dir: data root (``$ALIGNX_DATA_DIR``).
        split: held-out split of both data sets.

    Returns:
        ``{"harmlessness": SafetyValidity dict, "honesty": TruthValidity dict}``.
    """
    return {
        "harmlessness": validate_safety_judge(safety_judge, data_dir, split).to_dict(),
        "honesty": validate_truth_judge(truth_judge, data_dir, split).to_dict(),
    }
