"""Evaluation: the records judges read and write, and the protocols every judge implements.

Place in the pipeline: the harness turns generations into items (:class:`PairwiseItem`,
:class:`SafetyItem`, :class:`TruthItem`), a judge (``alignx.eval.judges``) turns items into
outcomes/verdicts, and ``alignx.eval.metrics`` turns those into report numbers. One protocol
per judging task is the seam between the harness and the three kinds of judge (OpenAI-
compatible HTTP, local Hugging Face classifier, offline embedding proxy) plus the fake.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "JudgeResponseError",
    "PairwiseItem",
    "PairwiseJudge",
    "SafetyItem",
    "SafetyJudge",
    "SafetyVerdict",
    "TruthItem",
    "TruthJudge",
    "TruthVerdict",
]


class JudgeResponseError(ValueError):
    """A judge produced no usable verdict (e.g. an unparsable LLM reply after all retries)."""


@dataclass(frozen=True)
class PairwiseItem:
    """One helpfulness comparison: which of two answers to ``prompt`` is better.

    Attributes:
        prompt: the instruction (with its input, if any).
        answer_a: the first contestant (the system under evaluation, by convention).
        answer_b: the second contestant (a baseline system or the reference outputs).
        reference: a reference answer the judge may use as a yardstick, never as a
            contestant; empty when there is none.
    """

    prompt: str
    answer_a: str
    answer_b: str
    reference: str = ""


@dataclass(frozen=True)
class SafetyItem:
    """One answer to judge for harm.

    Attributes:
        prompt: the (possibly adversarial) request; multi-turn dialogues are flattened text.
        answer: the system's reply.
    """

    prompt: str
    answer: str


@dataclass(frozen=True)
class TruthItem:
    """One TruthfulQA-style answer with the question's reference answers.

    Attributes:
        question: the question.
        answer: the system's answer.
        correct: true reference answers (a list is accepted and stored as a tuple).
        incorrect: false reference answers.
    """

    question: str
    answer: str
    correct: tuple[str, ...]
    incorrect: tuple[str, ...]

    def __post_init__(self) -> None:
        # Tuples keep the record hashable and immutable even when callers pass lists.
        object.__setattr__(self, "correct", tuple(self.correct))
        object.__setattr__(self, "incorrect", tuple(self.incorrect))


@dataclass(frozen=True)
class SafetyVerdict:
    """A safety judgement.

    Attributes:
        unsafe: the answer is judged harmful.
        score: the judge's harm score in [0, 1] (higher = more harmful); comparable within
            one judge only.
        refusal: the answer refuses or deflects the request.
        judge_id: the judge that produced this verdict (``fake:`` prefix for the fake).
    """

    unsafe: bool
    score: float
    refusal: bool
    judge_id: str = ""


@dataclass(frozen=True)
class TruthVerdict:
    """A truthfulness/informativeness judgement (TruthfulQA's GPT-judge + GPT-info pair).

    Attributes:
        truthful: the answer asserts nothing false (a non-answer such as "I have no
            comment" is truthful, as in TruthfulQA).
        informative: the answer actually addresses the question (not a refusal/non-answer).
        score: the judge's truthfulness score (higher = more truthful); comparable within
            one judge only.
        judge_id: the judge that produced this verdict.
    """

    truthful: bool
    informative: bool
    score: float
    judge_id: str = ""


@runtime_checkable
class PairwiseJudge(Protocol):
    """Judges helpfulness comparisons.

    Attributes:
        judge_id: printed next to every number this judge produces.
        is_proxy: the judge is an offline stand-in, not the paper's judge.
        is_fake: the judge is the deterministic test double.
    """

    judge_id: str
    is_proxy: bool
    is_fake: bool

    def judge_pairwise(self, items: Sequence[PairwiseItem]) -> list[float]:
        """Return one outcome per item: 1.0 = A wins, 0.5 = tie, 0.0 = B wins."""
        ...


@runtime_checkable
class SafetyJudge(Protocol):
    """Judges whether answers are harmful (same identity attributes as :class:`PairwiseJudge`)."""

    judge_id: str
    is_proxy: bool
    is_fake: bool

    def judge_safety(self, items: Sequence[SafetyItem]) -> list[SafetyVerdict]:
        """Return one :class:`SafetyVerdict` per item."""
        ...


@runtime_checkable
class TruthJudge(Protocol):
    """Judges truthfulness and informativeness (same identity attributes as above)."""

    judge_id: str
    is_proxy: bool
    is_fake: bool

    def judge_truthful(self, items: Sequence[TruthItem]) -> list[TruthVerdict]:
        """Return one :class:`TruthVerdict` per item."""
        ...
