"""TruthfulQA MC1/MC2 by log-likelihood (no judge), for every evaluated system.

Each choice is scored as the summed log-probability of its tokens after the prompt the system
would see when serving the question: its injected system text (the axis template for an
expert, none for the base model) and the model's chat template with the generation prompt.
A routed system (``alignx``, ``alignx-softmax``) scores each question with the expert it
routed that question to when answering it (read from the generations), so MC and the
generated answers come from the same model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from alignx.eval.harness import EvalPrompt, Generation

log = logging.getLogger(__name__)

#: ``name -> (model, tokenizer, system_text or None)``; ``name`` is ``base``, ``multitask``,
#: ``h3fusion`` or ``expert-<axis>``.
ScorerLoader = Callable[[str], "tuple[Any, Any, str | None]"]


def _prompt_text(tokenizer: Any, system: str | None, question: str) -> str:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def choice_logliks(model: Any, tokenizer: Any, system: str | None, question: str,
                   choices: Sequence[str], batch_size: int = 16) -> list[float]:
    """Summed log-probability of each choice's tokens after the system's prompt.

    Args:
        model: a causal LM (forward returns ``logits``).
        tokenizer: its tokenizer (with a chat template).
        system: the injected system text, or None.
        question: the TruthfulQA question.
        choices: the answer options.
        batch_size: choices per forward pass.

    Returns:
        One finite log-likelihood per choice.
    """
    import torch

    prompt_ids = tokenizer(_prompt_text(tokenizer, system, question),
                           add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[float] = []
    for start in range(0, len(choices), batch_size):
        chunk = choices[start:start + batch_size]
        seqs = [prompt_ids + tokenizer(" " + c.strip() if not c.startswith(" ") else c,
                                       add_special_tokens=False)["input_ids"] for c in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = ids[:, 1:]
        tok_lp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        for i, s in enumerate(seqs):
            lo, hi = len(prompt_ids) - 1, len(s) - 1  # positions predicting the choice tokens
            out.append(float(tok_lp[i, lo:hi].sum()))
    return out


def mc_from_logliks(scores: Sequence[float], labels: Sequence[int]) -> tuple[float, float]:
    """Per-question MC1 hit (0/1) and MC2 true mass (0..1), as in TruthfulQA's ``mc_calcs``."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=int)
    hit = float(s[y == 1].max() > s[y == 0].max())
    p = np.exp(s - s.max())
    return hit, float(p[y == 1].sum() / p.sum())


def _targets(meta: dict[str, Any], key: str) -> tuple[list[str], list[int]] | None:
    t = meta.get(key)
    if not t:
        return None
    choices = list(t)
    return choices, [int(t[c]) for c in choices]


class MCCache:
    """Per-question MC results kept across runs, in a :class:`~alignx.eval.judges.JudgeCache`
    (content-hash keys, JSON Lines, torn-tail safe): the key hashes the scoring model's name,
    what it was made from (``settings``), the question and its targets.

    A rerun (a changed judge, an interrupted evaluation) rescores only what is missing.
    """

    def __init__(self, path: str | Path, settings: dict[str, Any]):
        from alignx.eval.judges import JudgeCache

        self.store = JudgeCache(path)
        self.settings = settings

    def key(self, scorer: str, q: EvalPrompt) -> str:
        return self.store.key(f"mc:{scorer}", "mc1_mc2", {
            "settings": self.settings, "question": q.text,
            "mc1": q.meta.get("mc1_targets"), "mc2": q.meta.get("mc2_targets")})

    def get(self, key: str) -> tuple[float, float] | None:
        hit = self.store.get(key)
        return None if hit is None else (float(hit[0]), float(hit[1]))

    def add(self, key: str, mc1: float, mc2: float) -> None:
        self.store.put_many({key: [mc1, mc2]})


def mc_scores(
    systems: Sequence[str],
    questions: Sequence[EvalPrompt],
    gens: dict[str, dict[str, Generation]],
    loader: ScorerLoader,
    progress: bool = True,
    cache: MCCache | None = None,
) -> dict[str, dict[str, list[float]]]:
    """MC1 hits and MC2 masses per question for each system.

    Args:
        systems: evaluated systems (routed ones use the expert their generation was
            routed to).
        questions: TruthfulQA test prompts whose ``meta`` has ``mc1_targets``/``mc2_targets``
            (questions without them are skipped).
        gens: the generations (for routed systems' per-question expert).
        loader: loads a scoring model by name (see :data:`ScorerLoader`).
        progress: progress bar per scoring model.
        cache: per-question results kept across runs (a scoring model is loaded only when
            one of its questions is not cached).

    Returns:
        ``{system: {"mc1": [...], "mc2": [...], "uids": [...]}}``.
    """
    from tqdm.auto import tqdm

    qs = [q for q in questions if q.meta.get("mc1_targets") and q.meta.get("mc2_targets")]
    if len(qs) < len(questions):
        log.warning("MC: %d of %d questions have no MC targets; skipped",
                    len(questions) - len(qs), len(questions))
    # which scoring model answers which question, per system
    plan: dict[str, dict[str, str]] = {}
    for system in systems:
        if system.startswith("alignx"):
            plan[system] = {q.uid: f"expert-{gens[system][q.uid].routed_axis}" for q in qs}
        else:
            plan[system] = {q.uid: system for q in qs}
    needed: dict[str, set[str]] = {}
    for per_q in plan.values():
        for uid, scorer in per_q.items():
            needed.setdefault(scorer, set()).add(uid)
    results: dict[str, dict[str, tuple[float, float]]] = {}
    for scorer, uids in needed.items():
        res: dict[str, tuple[float, float]] = {}
        todo = []
        for q in qs:
            if q.uid in uids:
                hit = cache.get(cache.key(scorer, q)) if cache is not None else None
                if hit is not None:
                    res[q.uid] = hit
                else:
                    todo.append(q)
        if todo:
            model, tok, system_text = loader(scorer)
            model.eval()
            for q in tqdm(todo, desc=f"MC {scorer}", unit="q", disable=not progress,
                          dynamic_ncols=True):
                c1, y1 = _targets(q.meta, "mc1_targets")  # type: ignore[misc]
                c2, y2 = _targets(q.meta, "mc2_targets")  # type: ignore[misc]
                union = list(dict.fromkeys(c1 + c2))  # MC2 repeats MC1's choices: score once
                ll = dict(zip(union, choice_logliks(model, tok, system_text, q.text, union),
                              strict=True))
                res[q.uid] = (mc_from_logliks([ll[c] for c in c1], y1)[0],
                              mc_from_logliks([ll[c] for c in c2], y2)[1])
                if cache is not None:
                    cache.add(cache.key(scorer, q), *res[q.uid])
            del model
        elif progress:
            log.info("MC %s: all %d questions cached", scorer, len(res))
        results[scorer] = res
    out: dict[str, dict[str, list[float]]] = {}
    for system, per_q in plan.items():
        uids = [q.uid for q in qs]
        out[system] = {"mc1": [results[per_q[u]][u][0] for u in uids],
                       "mc2": [results[per_q[u]][u][1] for u in uids], "uids": uids}
    return out
