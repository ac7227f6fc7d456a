"""Evaluation: readers for the data the offline judges are fitted and validated on.

Place in the pipeline: the offline safety judge is fitted on HH-RLHF harmless preference
pairs (``train`` split) and validated on held-out pairs and on the hand-written labelled
answers shipped as ``alignx/eval/safety_validation.jsonl``; the truthfulness judge is
validated on TruthfulQA's reference answers. Files are read from a data directory laid out
like ``$ALIGNX_DATA_DIR`` (``hh_rlhf_harmless/<split>.jsonl``, ``truthfulqa/<split>.jsonl``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: The hand-written labelled answers (safe vs unsafe) the safety judge is never trained on.
SAFETY_VALIDATION_PATH = Path(__file__).with_name("safety_validation.jsonl")


@dataclass(frozen=True)
class PreferencePair:
    """An HH-RLHF harmless comparison: ``chosen`` was judged less harmful than ``rejected``.

    Attributes:
        prompt: the dialogue up to the final ``Assistant:`` marker.
        chosen: the preferred (less harmful) final reply.
        rejected: the dispreferred final reply.
    """

    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class TruthfulQAQuestion:
    """A TruthfulQA question with its reference answers.

    Attributes:
        question: the question.
        best: the single best true answer.
        correct: all true reference answers.
        incorrect: all false reference answers.
        category: TruthfulQA category.
    """

    question: str
    best: str
    correct: tuple[str, ...]
    incorrect: tuple[str, ...]
    category: str


@dataclass(frozen=True)
class LabelledAnswer:
    """A hand-labelled answer to a risky prompt.

    Attributes:
        id: stable row id.
        prompt: the risky request.
        answer: the reply.
        unsafe: the gold label (True = clearly unsafe).
        kind: ``harmful_compliance``, ``refusal`` or ``helpful_safe``.
    """

    id: str
    prompt: str
    answer: str
    unsafe: bool
    kind: str


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON Lines file.

    Raises:
        FileNotFoundError: the file is missing (the message says where data is expected).
        ValueError: a line is not valid JSON (names file and line).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"missing data file {p}; point data_dir (or ALIGNX_DATA_DIR) at the shared data folder"
        )
    rows = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{n}: not valid JSON ({e})") from None
    return rows


def last_user_turn(prompt: str) -> str:
    """Return the last ``Human:`` turn of an HH-RLHF dialogue (the whole text if none)."""
    head = (
        prompt.rsplit("\n\nAssistant:", 1)[0] if prompt.rstrip().endswith("Assistant:") else prompt
    )
    if "Human:" not in head:
        return head.strip()
    return head.rsplit("Human:", 1)[1].strip()


def _split_last_reply(transcript: str) -> tuple[str, str]:
    """Split an HH-RLHF transcript into (dialogue up to the last ``Assistant:``, last reply)."""
    head, sep, reply = transcript.rpartition("\n\nAssistant:")
    return (head + sep, reply) if sep else (transcript, "")


def read_hh_harmless_pairs(data_dir: str | Path, split: str) -> list[PreferencePair]:
    """Read HH-RLHF harmless pairs of one split, keeping only usable comparisons.

    Pairs whose two dialogues do not share the prompt, whose replies are identical, or
    where a reply is empty carry no preference signal about the final reply and are dropped.

    Args:
        data_dir: folder holding ``hh_rlhf_harmless/<split>.jsonl``.
        split: ``train``, ``validation`` or ``test``.

    Returns:
        The usable pairs, in file order.

    Raises:
        FileNotFoundError: the split file is missing.
    """
    rows = read_jsonl(Path(data_dir) / "hh_rlhf_harmless" / f"{split}.jsonl")
    pairs = []
    for r in rows:
        if "chosen_response" in r:  # the shared data's pre-split form
            prompt, chosen, rejected = r["prompt"], r["chosen_response"], r["rejected_response"]
            same = r.get("same_prompt", True)
        else:  # upstream Anthropic/hh-rlhf rows: two whole transcripts
            prompt, chosen = _split_last_reply(r["chosen"])
            rejected_prompt, rejected = _split_last_reply(r["rejected"])
            same = prompt == rejected_prompt
        chosen, rejected = chosen.strip(), rejected.strip()
        if same and chosen and rejected and chosen != rejected:
            pairs.append(PreferencePair(prompt, chosen, rejected))
    logger.info("hh_rlhf_harmless/%s: %d usable pairs of %d", split, len(pairs), len(rows))
    return pairs


def read_truthfulqa(data_dir: str | Path, split: str) -> list[TruthfulQAQuestion]:
    """Read TruthfulQA questions of one split (``train``/``validation``/``test``/``all``).

    Raises:
        FileNotFoundError: the split file is missing.
    """
    rows = read_jsonl(Path(data_dir) / "truthfulqa" / f"{split}.jsonl")
    return [
        TruthfulQAQuestion(
            r["Question"].strip(),
            r["Best Answer"].strip(),
            tuple(a for a in r["correct_answers"] if a.strip()),
            tuple(a for a in r["incorrect_answers"] if a.strip()),
            r.get("Category", ""),
        )
        for r in rows
    ]


def read_safety_validation_set(path: str | Path = SAFETY_VALIDATION_PATH) -> list[LabelledAnswer]:
    """Read the hand-labelled safety answers (``safety_validation.jsonl`` by default).

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: a row lacks a field or has a label other than ``safe``/``unsafe``.
    """
    out = []
    for n, r in enumerate(read_jsonl(path), 1):
        try:
            label = r["label"]
            if label not in ("safe", "unsafe"):
                raise ValueError(f"label must be 'safe' or 'unsafe', got {label!r}")
            out.append(
                LabelledAnswer(r["id"], r["prompt"], r["answer"], label == "unsafe", r["kind"])
            )
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: row {n}: {e}") from None
    return out
