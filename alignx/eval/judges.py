"""Evaluation: judges behind one protocol per task, their cache, config and factory.

Place in the pipeline: ``evaluate`` generates answers for each axis, then calls the judges
built here by :func:`build_judges`: a pairwise helpfulness judge (Alpaca win rate), a safety
judge (safety score) and a truthfulness judge (TruthfulQA truthful x informative). Each task
has one protocol (``alignx.eval.records``) and three kinds of implementation (METHOD.md,
"Evaluation protocol"), plus a fake:

=======  =====================================  =========================================
kind     class (module)                         judge_id
=======  =====================================  =========================================
openai   ``OpenAIJudge`` (``openai_judge``)     ``openai:<model>[@<base_url>]`` (GPT-4 or
                                                a local OpenAI-compatible server)
hf       ``HFClassifierJudge`` (``hf_judge``)   ``hf:<path>`` (beaver-dam-style classifier,
                                                reward model, TruthfulQA judge)
offline  ``Embedding*Judge`` (``offline_judges``)  ``offline:minilm-...-v1 (proxy)``
fake     :class:`FakeJudge` (here)              ``fake:rules-v1`` (tests only)
=======  =====================================  =========================================

All of them are importable from this module, the harness's single entry point.

Every number a report prints names the ``judge_id`` that produced it; proxies say so.
Judge calls are cached by content hash (:class:`JudgeCache`, :func:`cached`), like
lm-eval's ``CachingLM``, so a resumed evaluation does not pay twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from alignx import envs
from alignx.eval.hf_judge import HF_ROLES, HFClassifierJudge, Task
from alignx.eval.judge_data import read_hh_harmless_pairs
from alignx.eval.offline_judges import (
    EmbeddingPairwiseJudge,
    EmbeddingSafetyJudge,
    EmbeddingTruthJudge,
    MiniLMEncoder,
    RefusalDetector,
    SentenceEncoder,
    default_encoder,
    is_non_answer,
    is_refusal,
)
from alignx.eval.openai_judge import (
    OpenAIJudge,
    parse_pairwise_reply,
    parse_safety_reply,
    parse_truth_reply,
)
from alignx.eval.records import (
    JudgeResponseError,
    PairwiseItem,
    PairwiseJudge,
    SafetyItem,
    SafetyJudge,
    SafetyVerdict,
    TruthItem,
    TruthJudge,
    TruthVerdict,
)

__all__ = [
    "CachedJudge",
    "EmbeddingPairwiseJudge",
    "EmbeddingSafetyJudge",
    "EmbeddingTruthJudge",
    "FakeJudge",
    "HFClassifierJudge",
    "JudgeCache",
    "JudgeCfg",
    "JudgeConfigError",
    "JudgeResponseError",
    "Judges",
    "JudgesCfg",
    "MiniLMEncoder",
    "OpenAIJudge",
    "PairwiseItem",
    "PairwiseJudge",
    "RefusalDetector",
    "SafetyItem",
    "SafetyJudge",
    "SafetyVerdict",
    "SentenceEncoder",
    "TruthItem",
    "TruthJudge",
    "TruthVerdict",
    "build_judges",
    "cached",
    "default_safety_judge_dir",
    "parse_pairwise_reply",
    "parse_safety_reply",
    "parse_truth_reply",
    "HF_ROLES",
]

logger = logging.getLogger(__name__)


class JudgeConfigError(ValueError):
    """A judge configuration problem; the message names every bad key."""


# ----------------------------------------------------------------------------- fake


class FakeJudge:
    """Deterministic rule-based judge for tests (alpaca_eval ``test_completions`` style).

    Rules: pairwise, the longer answer wins (equal length: tie); safety, an answer is unsafe
    iff it contains the word "unsafe" and is not a refusal; truthfulness, truthful iff the
    answer contains a correct reference (case-insensitive) or is a non-answer, informative
    iff it is not a non-answer. Every verdict carries ``judge_id = "fake:rules-v1"``.
    """

    judge_id = "fake:rules-v1"
    is_proxy = True
    is_fake = True

    def judge_pairwise(self, items: Sequence[PairwiseItem]) -> list[float]:
        """1.0 if ``answer_a`` is longer, 0.0 if shorter, 0.5 if equally long."""
        out = []
        for it in items:
            la, lb = len(it.answer_a.strip()), len(it.answer_b.strip())
            out.append(1.0 if la > lb else 0.0 if la < lb else 0.5)
        return out

    def judge_safety(self, items: Sequence[SafetyItem]) -> list[SafetyVerdict]:
        """Unsafe iff the answer says "unsafe" and does not refuse."""
        out = []
        for it in items:
            refusal = is_refusal(it.answer)
            unsafe = bool(re.search(r"\bunsafe\b", it.answer.lower())) and not refusal
            out.append(SafetyVerdict(unsafe, float(unsafe), refusal, self.judge_id))
        return out

    def judge_truthful(self, items: Sequence[TruthItem]) -> list[TruthVerdict]:
        """Truthful iff a correct reference is contained in the answer (or it is a non-answer)."""
        out = []
        for it in items:
            ans = it.answer.lower()
            non = is_non_answer(it.answer)
            truthful = non or any(c.lower().strip(" .") in ans for c in it.correct if c.strip())
            out.append(TruthVerdict(truthful, not non, float(truthful), self.judge_id))
        return out


# ----------------------------------------------------------------------------- cache


class JudgeCache:
    """Judge results keyed by ``sha256(judge_id, task, item)``, stored as JSON Lines.

    Each :meth:`put_many` appends its lines with one ``write`` and fsyncs, so a crash loses
    at most the batch in flight; a torn last line is skipped (with a warning) on load.
    Thread-safe within a process.

    Args:
        path: the ``.jsonl`` file (created on first write).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {}
        self._torn_tail = False
        if self.path.is_file():
            raw = self.path.read_text("utf-8")
            self._torn_tail = bool(raw) and not raw.endswith("\n")
            for n, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    self._data[rec["key"]] = rec["value"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    logger.warning("%s:%d: skipping an unreadable cache line", self.path, n)

    @staticmethod
    def key(judge_id: str, task: str, item: Any) -> str:
        """Content hash of one judge call."""
        payload = dataclasses.asdict(item) if dataclasses.is_dataclass(item) else item
        blob = json.dumps([judge_id, task, payload], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def get(self, key: str) -> Any:
        """The stored value, or None."""
        return self._data.get(key)

    def put_many(self, entries: Mapping[str, Any]) -> None:
        """Store and append ``key -> value`` entries (JSON-serialisable values)."""
        if not entries:
            return
        lines = "".join(
            json.dumps({"key": k, "value": v}, ensure_ascii=False) + "\n"
            for k, v in entries.items()
        )
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(("\n" if self._torn_tail else "") + lines)
                f.flush()
                os.fsync(f.fileno())
            self._torn_tail = False
            self._data.update(entries)


class CachedJudge:
    """A judge whose calls go through a :class:`JudgeCache` (see :func:`cached`).

    Only the items missing from the cache reach the wrapped judge (duplicates once).
    ``hits`` and ``misses`` count items.
    """

    def __init__(self, judge: Any, cache: JudgeCache) -> None:
        self.judge = judge
        self.cache = cache
        self.judge_id: str = judge.judge_id
        self.is_proxy: bool = judge.is_proxy
        self.is_fake: bool = judge.is_fake
        self.hits = 0
        self.misses = 0

    def _run(
        self,
        task: Task,
        items: Sequence[Any],
        call: Callable[[list[Any]], list[Any]],
        dump: Callable[[Any], Any],
        load: Callable[[Any], Any],
    ) -> list[Any]:
        keys = [JudgeCache.key(self.judge_id, task, it) for it in items]
        todo = {k: it for k, it in zip(keys, items, strict=True) if k not in self.cache}
        self.misses += sum(k in todo for k in keys)
        self.hits += len(keys) - sum(k in todo for k in keys)
        if todo:
            results = call(list(todo.values()))
            if len(results) != len(todo):
                raise JudgeResponseError(
                    f"{self.judge_id} returned {len(results)} results for {len(todo)} items"
                )
            self.cache.put_many({k: dump(r) for k, r in zip(todo, results, strict=True)})
        return [load(self.cache.get(k)) for k in keys]

    def judge_pairwise(self, items: Sequence[PairwiseItem]) -> list[float]:
        return self._run("pairwise", items, self.judge.judge_pairwise, float, float)

    def judge_safety(self, items: Sequence[SafetyItem]) -> list[SafetyVerdict]:
        return self._run(
            "safety",
            items,
            self.judge.judge_safety,
            dataclasses.asdict,
            lambda d: SafetyVerdict(**d),
        )

    def judge_truthful(self, items: Sequence[TruthItem]) -> list[TruthVerdict]:
        return self._run(
            "truthful",
            items,
            self.judge.judge_truthful,
            dataclasses.asdict,
            lambda d: TruthVerdict(**d),
        )


def cached(judge: Any, cache: JudgeCache) -> CachedJudge:
    """Wrap ``judge`` so repeated items are answered from ``cache``.

    Args:
        judge: any pairwise/safety/truth judge.
        cache: the cache (shared by several judges is fine: keys include ``judge_id``).

    Returns:
        A judge with the same ``judge_id`` and methods.
    """
    return CachedJudge(judge, cache)


# ----------------------------------------------------------------------------- config


class JudgeCfg(BaseModel):
    """How one task is judged.

    Attributes:
        kind: ``offline`` (MiniLM proxies, default), ``openai``, ``hf`` or ``fake``.
        model: server-side model name (openai).
        base_url: OpenAI-compatible server URL (openai; None = api.openai.com).
        api_key_env: environment variable with the key (openai; null = no auth).
        path: model directory (hf); fitted-judge directory (offline safety).
        label_map: model label -> role (hf).
        margin: tie margin (pairwise) / decision margin (offline truth); None = default.
        threshold: probability at which a classifier verdict is positive.
        max_retries: retries of an unusable reply (openai).
        timeout_s: HTTP timeout (openai).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["offline", "openai", "hf", "fake"] = "offline"
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = "OPENAI_API_KEY"
    path: str | None = None
    label_map: dict[str, str] = Field(default_factory=dict)
    margin: float | None = Field(None, ge=0.0)
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    max_retries: int = Field(3, ge=0)
    timeout_s: float = Field(60.0, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> JudgeCfg:
        if self.kind == "openai" and not self.model:
            raise ValueError("model is required when kind='openai' (e.g. model: gpt-4)")
        if self.kind == "hf" and not self.path:
            raise ValueError("path is required when kind='hf' (a local classifier directory)")
        if self.label_map and self.kind != "hf":
            raise ValueError(f"label_map is only used when kind='hf', not kind={self.kind!r}")
        if (self.model or self.base_url) and self.kind != "openai":
            raise ValueError(
                f"model/base_url are only used when kind='openai', not kind={self.kind!r}"
            )
        return self


class JudgesCfg(BaseModel):
    """One :class:`JudgeCfg` per axis: helpfulness (pairwise), harmlessness, honesty."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    helpfulness: JudgeCfg = JudgeCfg()
    harmlessness: JudgeCfg = JudgeCfg()
    honesty: JudgeCfg = JudgeCfg()


@dataclass(frozen=True)
class Judges:
    """The three judges of an evaluation, by axis."""

    helpfulness: PairwiseJudge
    harmlessness: SafetyJudge
    honesty: TruthJudge

    def ids(self) -> dict[str, str]:
        """``axis -> judge_id``, for reports."""
        return {
            "helpfulness": self.helpfulness.judge_id,
            "harmlessness": self.harmlessness.judge_id,
            "honesty": self.honesty.judge_id,
        }


def default_safety_judge_dir() -> Path:
    """Where the offline safety judge is fitted/loaded when no path is configured."""
    return envs.cache_dir() / "judges" / "minilm-safety-v1"


def _validate_cfg(cfg: JudgesCfg | Mapping[str, Any], key_prefix: str) -> JudgesCfg:
    if isinstance(cfg, JudgesCfg):
        return cfg
    try:
        return JudgesCfg.model_validate(dict(cfg))
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(p) for p in (key_prefix, *err["loc"]) if p)
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{loc}: {msg}")
        raise JudgeConfigError("invalid judge config:\n  " + "\n  ".join(problems)) from None


def _load_or_fit_safety(
    cfg: JudgeCfg, data_dir: str | Path | None, encoder: SentenceEncoder, key: str
) -> EmbeddingSafetyJudge:
    path = Path(cfg.path).expanduser() if cfg.path else default_safety_judge_dir()
    if (path / "safety_judge.json").is_file():
        return EmbeddingSafetyJudge.load(path, encoder, threshold=cfg.threshold)
    data = Path(data_dir) if data_dir else envs.data_dir()
    if data is None:
        raise JudgeConfigError(
            f"{key}: no fitted offline safety judge in {path} and no data to fit one: set "
            f"ALIGNX_DATA_DIR (needs hh_rlhf_harmless/train.jsonl) or {key}.path"
        )
    pairs = read_hh_harmless_pairs(data, "train")
    judge = EmbeddingSafetyJudge.fit(
        pairs,
        encoder,
        data_source=str(data / "hh_rlhf_harmless" / "train.jsonl"),
        threshold=cfg.threshold,
    )
    judge.save(path)
    logger.info("saved the offline safety judge to %s", path)
    return judge


def build_judges(
    cfg: JudgesCfg | Mapping[str, Any],
    *,
    data_dir: str | Path | None = None,
    cache_path: str | Path | None = None,
    encoder: SentenceEncoder | None = None,
    key_prefix: str = "eval.judges",
) -> Judges:
    """Build the three judges from config.

    Args:
        cfg: a :class:`JudgesCfg` or its dict form, e.g. ``{"harmlessness": {"kind": "hf",
            "path": "/models/beaver-dam-7b", "label_map": {...}}}``; missing axes are offline.
        data_dir: data root for fitting the offline safety judge when it is not fitted yet
            (default ``$ALIGNX_DATA_DIR``).
        cache_path: JSON Lines judge cache shared by the three judges; None = no cache.
        encoder: sentence encoder for offline judges (default: the shared MiniLM).
        key_prefix: config path printed in error messages.

    Returns:
        The :class:`Judges`.

    Raises:
        JudgeConfigError: invalid config (every bad key named), or no way to get the offline
            safety judge.
        ValueError: an OpenAI judge's ``api_key_env`` is unset, or an HF label map is wrong.
    """
    c = _validate_cfg(cfg, key_prefix)
    cache = JudgeCache(cache_path) if cache_path else None
    built: dict[str, Any] = {}
    for axis, task in (
        ("helpfulness", "pairwise"),
        ("harmlessness", "safety"),
        ("honesty", "truthful"),
    ):
        jc: JudgeCfg = getattr(c, axis)
        key = f"{key_prefix}.{axis}"
        judge: Any
        if jc.kind == "fake":
            judge = FakeJudge()
        elif jc.kind == "openai":
            judge = OpenAIJudge(
                jc.model or "",
                jc.base_url,
                jc.api_key_env,
                max_retries=jc.max_retries,
                timeout_s=jc.timeout_s,
            )
        elif jc.kind == "hf":
            judge = HFClassifierJudge(
                jc.path or "",
                task,
                jc.label_map or None,
                threshold=jc.threshold,
                margin=jc.margin or 0.0,
            )
        else:
            enc = encoder or default_encoder()
            if task == "pairwise":
                judge = EmbeddingPairwiseJudge(enc, 0.02 if jc.margin is None else jc.margin)
            elif task == "safety":
                judge = _load_or_fit_safety(jc, data_dir, enc, key)
            else:
                judge = EmbeddingTruthJudge(enc, 0.0 if jc.margin is None else jc.margin)
        built[axis] = cached(judge, cache) if cache is not None else judge
        logger.info("%s judge: %s", axis, built[axis].judge_id)
    return Judges(**built)
