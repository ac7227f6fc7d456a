"""Evaluation harness: generate each system's answers through the Serve app, judge, score.

Flow (``alignx evaluate`` / the pipeline's evaluate stage, METHOD.md evaluation protocol):

1. :func:`load_eval_prompts` reads each axis's **test** split from the configured source
   (a deterministic ``eval.prompts_per_axis`` subsample; never the training data).
2. :func:`generate_all` sends every prompt to every system (``eval.systems`` are model ids of
   the AlignX Serve app: ``alignx``, ``alignx-softmax``, ``base``, ``multitask``,
   ``h3fusion``, ``expert-<axis>``) over HTTP, ``eval.concurrency`` requests in flight per
   system. Answers are appended to ``eval/generations.jsonl`` as they arrive, keyed by a
   content hash of (system, prompt, generation settings, artifacts), so an interrupted run
   resumes where it stopped and a changed setting regenerates only what it affects.
3. :func:`score_systems` judges the answers (judge calls cached in ``eval/judge_cache.jsonl``)
   and computes win rate, safety score, truthful x informative, MC1/MC2 (from
   :mod:`alignx.eval.mc`, log-likelihoods of the same models the app serves) and the average
   alignment score, each with a 95% bootstrap CI.
4. :mod:`alignx.eval.report` writes ``report.json``, ``report.md`` and the plots.

Every number carries the id of the judge that produced it; offline judges are proxies and
say so, the fake judge's numbers are marked FAKE.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alignx.axes import Axis

if TYPE_CHECKING:
    from alignx.config import AlignXConfig
    from alignx.eval.judges import Judges

log = logging.getLogger(__name__)

#: Metric keys of one system's row, in report order.
ROW_METRICS = ("win_rate", "safety_score", "truthful_informative", "mc1", "mc2", "alignment_score")


# ----------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class EvalPrompt:
    """One test prompt of one axis.

    Attributes:
        uid: stable id from the source (``alpaca:123``).
        axis: the axis whose test split it comes from.
        messages: the conversation, ending with a user turn (no axis template).
        reference: the dataset's reference answer (Alpaca output, HH chosen reply, TruthfulQA
            best answer).
        meta: source extras (TruthfulQA reference answers and MC targets).
    """

    uid: str
    axis: Axis
    messages: tuple[dict[str, str], ...]
    reference: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The last user turn (what a one-line prompt would be)."""
        return self.messages[-1]["content"]


def load_eval_prompts(cfg: AlignXConfig) -> dict[Axis, list[EvalPrompt]]:
    """Read each axis's test split and take the configured deterministic subsample.

    Raises:
        AlignXConfigError / DataFormatError / SourceNotFoundError: as the data readers.
    """
    from alignx.data.prepare import subsample
    from alignx.data.sources import read_source

    data_dir = Path(cfg.data.data_dir) if cfg.data.data_dir else None
    out: dict[Axis, list[EvalPrompt]] = {}
    for axis in cfg.axes:
        src = cfg.data.sources[axis]
        rows = read_source(src, axis, "test", data_dir, from_hub=cfg.data.from_hub, seed=cfg.data.seed)
        rows = [r for r in rows if not r.meta.get("alt_answer")]  # one row per question
        rows = subsample(rows, cfg.eval.prompts_per_axis, cfg.seed)
        out[axis] = [EvalPrompt(r.uid, axis, tuple(dict(m) for m in r.messages), r.response,
                                dict(r.meta)) for r in rows]
        log.info("eval: %d %s test prompts from %s", len(out[axis]), axis.value, src)
    return out


def hh_text(messages: Sequence[dict[str, str]]) -> str:
    """Render a conversation as an HH-RLHF transcript ending with ``Assistant:`` (the form the
    offline safety judge was fitted on)."""
    parts = [f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
             for m in messages if m["role"] in ("user", "assistant")]
    return "".join(parts) + "\n\nAssistant:"


# ----------------------------------------------------------------------------- generations


@dataclass(frozen=True)
class Generation:
    """One system's answer to one prompt (a line of ``eval/generations.jsonl``).

    Attributes:
        key: content hash of (system, prompt, settings, artifacts fingerprint).
        system: model id on the Serve app.
        uid: the prompt's uid.
        axis: the prompt's axis.
        text: the answer.
        latency_ms: client-side request latency (HTTP round trip, under ``concurrency``).
        completion_tokens: tokens generated (from ``usage``).
        routed_axis: the expert that answered (AlignX systems; the axis for ``expert-*``).
        confidence: the router's confidence (routed systems only).
        error: non-empty when the request failed after its retries (text is then empty).
    """

    key: str
    system: str
    uid: str
    axis: str
    text: str
    latency_ms: float
    completion_tokens: int = 0
    routed_axis: str | None = None
    confidence: float | None = None
    error: str = ""


def generation_key(system: str, prompt: EvalPrompt, settings: dict[str, Any]) -> str:
    """Content hash that decides whether a stored answer can be reused."""
    blob = json.dumps({"system": system, "messages": prompt.messages, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class GenerationStore:
    """Append-only JSON Lines of :class:`Generation` (thread-safe; a torn last line from a
    crash is ignored on reload, so a killed run loses at most the answers in flight)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._rows: dict[str, Generation] = {}
        if self.path.is_file():
            with self.path.open(encoding="utf-8") as f:
                for line in f:
                    try:
                        g = Generation(**json.loads(line))
                    except (json.JSONDecodeError, TypeError):
                        continue  # a torn write
                    if not g.error:
                        self._rows[g.key] = g

    def get(self, key: str) -> Generation | None:
        return self._rows.get(key)

    def add(self, g: Generation) -> None:
        with self._lock:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(asdict(g)) + "\n")
                f.flush()
            if not g.error:
                self._rows[g.key] = g

    def __len__(self) -> int:
        return len(self._rows)


class ServeClient:
    """OpenAI-compatible chat client for the AlignX Serve app (plain ``requests``).

    Args:
        base_url: ``http://host:port[/prefix]`` (the app's route prefix, no ``/v1``).
        api_key: bearer key when the app has auth enabled.
        timeout_s: per-request timeout.
        retries: retries of a 503 (overload) or connection error, with backoff.
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 300.0,
                 retries: int = 3):
        import requests

        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self._session = requests.Session()
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"

    def models(self) -> list[str]:
        """Model ids the app serves (``GET /v1/models``)."""
        r = self._session.get(f"{self.base_url}/v1/models", timeout=self.timeout_s)
        r.raise_for_status()
        return [m["id"] for m in r.json()["data"]]

    def chat(self, model: str, messages: Sequence[dict[str, str]], max_tokens: int,
             temperature: float) -> dict[str, Any]:
        """One chat completion; returns the response JSON plus ``latency_ms``.

        Raises:
            RuntimeError: a 4xx (the request is wrong: retrying would not help) or a
                5xx/connection error after all retries; the message has the server's error.
        """
        import requests

        body = {"model": model, "messages": list(messages), "max_tokens": max_tokens,
                "temperature": temperature}
        last = ""
        for attempt in range(self.retries + 1):
            t0 = time.perf_counter()
            try:
                r = self._session.post(f"{self.base_url}/v1/chat/completions", json=body,
                                       timeout=self.timeout_s)
            except requests.RequestException as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    out = r.json()
                    out["latency_ms"] = (time.perf_counter() - t0) * 1000
                    return out
                last = f"HTTP {r.status_code}: {r.text[:300]}"
                if 400 <= r.status_code < 500 and r.status_code != 429:
                    break
            time.sleep(min(2.0 ** attempt, 10.0))
        raise RuntimeError(f"{model}: {last}")


def _to_generation(key: str, system: str, p: EvalPrompt, resp: dict[str, Any]) -> Generation:
    info = resp.get("alignx") or {}
    usage = resp.get("usage") or {}
    conf = info.get("confidence")
    return Generation(
        key=key, system=system, uid=p.uid, axis=p.axis.value,
        text=resp["choices"][0]["message"]["content"] or "",
        latency_ms=round(float(resp["latency_ms"]), 2),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        routed_axis=info.get("axis"),
        confidence=None if conf is None else float(conf),
    )


def stored_generations(
    store: GenerationStore,
    systems: Sequence[str],
    prompts: dict[Axis, list[EvalPrompt]],
    settings: dict[str, Any],
) -> tuple[dict[str, dict[str, Generation]], list[tuple[str, str, EvalPrompt]]]:
    """Split the evaluation into stored answers and what is still to ask.

    Returns:
        ``({system: {uid: Generation}}`` of the stored answers, ``[(system, key, prompt)]`` of
        the missing ones).
    """
    out: dict[str, dict[str, Generation]] = {s: {} for s in systems}
    todo: list[tuple[str, str, EvalPrompt]] = []
    for system in systems:
        for p in (p for ps in prompts.values() for p in ps):
            key = generation_key(system, p, settings)
            got = store.get(key)
            if got is not None:
                out[system][p.uid] = got
            else:
                todo.append((system, key, p))
    return out, todo


def generate_all(
    client: ServeClient | None,
    store: GenerationStore,
    systems: Sequence[str],
    prompts: dict[Axis, list[EvalPrompt]],
    settings: dict[str, Any],
    concurrency: int,
    progress: bool = True,
) -> dict[str, dict[str, Generation]]:
    """Answer every prompt with every system, reusing stored answers.

    Args:
        client: the Serve app client; None when every answer is stored already.
        store: where answers are appended (and resumed from).
        systems: model ids to query.
        prompts: the test prompts by axis.
        settings: generation settings and artifact fingerprints that go into the key
            (``max_tokens``, ``temperature``, stage hashes ...).
        concurrency: requests in flight per system (all systems are queried at once).
        progress: show a progress bar.

    Returns:
        ``{system: {uid: Generation}}`` for every prompt.

    Raises:
        RuntimeError: some requests failed after their retries (the answers that did
            arrive are stored; rerunning resumes).
        ValueError: answers are missing and ``client`` is None.
    """
    from tqdm.auto import tqdm

    out, todo = stored_generations(store, systems, prompts, settings)
    if todo and client is None:
        raise ValueError(f"{len(todo)} answers are not stored yet and no app was given to ask")
    total = sum(len(ps) for ps in prompts.values()) * len(systems)
    bar = tqdm(total=total, initial=total - len(todo), desc=f"generate ({len(systems)} systems)",
               unit="ans", disable=not progress, dynamic_ncols=True)
    failures: list[str] = []

    def one(system: str, key: str, p: EvalPrompt) -> Generation:
        resp = client.chat(system, p.messages, settings["max_tokens"], settings["temperature"])
        return _to_generation(key, system, p, resp)

    # All systems at once: their deployments are separate replicas, so they generate in
    # parallel. One pool per system keeps exactly `concurrency` requests in flight on each (a
    # shared pool would take the tasks in list order: one system at a time, the other
    # replicas idle).
    pools = {s: ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"gen-{s}")
             for s in systems}
    try:
        futs = {pools[t[0]].submit(one, *t): t for t in todo}
        for fut in as_completed(futs):
            system, key, p = futs[fut]
            try:
                g = fut.result()
            except RuntimeError as e:
                g = Generation(key, system, p.uid, p.axis.value, "", 0.0, error=str(e))
                failures.append(f"{system}/{p.uid}: {e}")
            store.add(g)
            if not g.error:
                out[system][p.uid] = g
            bar.update(1)
    finally:
        for pool in pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed (answers so far are saved; rerun to "
                           f"resume); first: {failures[0]}")
    return out


# ----------------------------------------------------------------------------- scoring


@dataclass
class MetricValue:
    """A metric with its 95% bootstrap CI and the judge that produced it."""

    value: float
    low: float
    high: float
    n: int
    judge: str

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _ci(values: np.ndarray, stat: Callable[[np.ndarray], float], judge: str, n_boot: int,
        seed: int) -> MetricValue:
    from alignx.eval.metrics import bootstrap_ci

    ci = bootstrap_ci(values, stat, n_boot=n_boot, seed=seed)
    return MetricValue(ci.estimate, ci.low, ci.high, int(values.shape[0]), judge)


def _judge_label(judge: Any) -> str:
    tag = "FAKE " if getattr(judge, "is_fake", False) else ("proxy " if getattr(judge, "is_proxy", False) else "")
    return f"{tag}{judge.judge_id}".strip()


def score_systems(
    cfg: AlignXConfig,
    judges: Judges,
    prompts: dict[Axis, list[EvalPrompt]],
    gens: dict[str, dict[str, Generation]],
    mc: dict[str, dict[str, list[float]]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Judge every system's answers and compute the protocol's metrics with CIs.

    Args:
        cfg: the run config (``eval.win_rate_vs``, ``eval.bootstrap_samples``, seed).
        judges: the three judges.
        prompts: the test prompts by axis.
        gens: ``{system: {uid: Generation}}``.
        mc: ``{system: {"mc1": [...per question 0/1], "mc2": [...per question mass]}}`` from
            :func:`alignx.eval.mc.mc_scores`, or None to skip MC1/MC2.

    Returns:
        ``{system: {metric: MetricValue dict, "per_item": {...}, "routing": {...}}}``.
    """
    from alignx.eval.metrics import alignment_score
    from alignx.eval.records import PairwiseItem, SafetyItem, TruthItem

    n_boot, seed = cfg.eval.bootstrap_samples, cfg.seed
    vs = cfg.eval.win_rate_vs
    out: dict[str, dict[str, Any]] = {}
    for system, by_uid in gens.items():
        row: dict[str, Any] = {"per_item": {}}
        if Axis.HELPFULNESS in prompts:
            ps = prompts[Axis.HELPFULNESS]
            items = [PairwiseItem(
                p.text,  # the instruction (Alpaca prompts are single-turn)
                by_uid[p.uid].text,
                p.reference if vs == "reference" else gens[vs][p.uid].text,
                p.reference) for p in ps]
            outcomes = np.asarray(judges.helpfulness.judge_pairwise(items), dtype=float)
            row["win_rate"] = _ci(outcomes, lambda a: 100.0 * float(a.mean()),
                                  _judge_label(judges.helpfulness), n_boot, seed).to_dict()
            row["win_rate"]["vs"] = vs
            row["per_item"]["win"] = {p.uid: float(o) for p, o in zip(ps, outcomes, strict=True)}
        if Axis.HARMLESSNESS in prompts:
            ps = prompts[Axis.HARMLESSNESS]
            verdicts = judges.harmlessness.judge_safety(
                [SafetyItem(hh_text(p.messages), by_uid[p.uid].text) for p in ps])
            unsafe = np.asarray([v.unsafe for v in verdicts], dtype=float)
            row["safety_score"] = _ci(unsafe, lambda a: 100.0 * float(a.mean()),
                                      _judge_label(judges.harmlessness), n_boot, seed).to_dict()
            row["refusal_rate"] = round(100.0 * float(np.mean([v.refusal for v in verdicts])), 2)
            row["per_item"]["unsafe"] = {p.uid: bool(u) for p, u in zip(ps, unsafe, strict=True)}
        if Axis.HONESTY in prompts:
            ps = prompts[Axis.HONESTY]
            verdicts = judges.honesty.judge_truthful([TruthItem(
                p.text, by_uid[p.uid].text, tuple(p.meta.get("correct_answers") or [p.reference]),
                tuple(p.meta.get("incorrect_answers") or ())) for p in ps])
            ti = np.asarray([v.truthful and v.informative for v in verdicts], dtype=float)
            row["truthful_informative"] = _ci(ti, lambda a: 100.0 * float(a.mean()),
                                              _judge_label(judges.honesty), n_boot, seed).to_dict()
            row["truthful"] = round(100.0 * float(np.mean([v.truthful for v in verdicts])), 2)
            row["informative"] = round(100.0 * float(np.mean([v.informative for v in verdicts])), 2)
            row["per_item"]["ti"] = {p.uid: bool(t) for p, t in zip(ps, ti, strict=True)}
        if mc and system in mc:
            for k in ("mc1", "mc2"):
                arr = np.asarray(mc[system][k], dtype=float)
                row[k] = _ci(arr, lambda a: 100.0 * float(a.mean()), "log-likelihood (no judge)",
                             n_boot, seed).to_dict()
        if all(k in row for k in ("win_rate", "safety_score", "truthful_informative")):
            row["alignment_score"] = {
                "value": round(alignment_score(row["win_rate"]["value"],
                                               row["truthful_informative"]["value"],
                                               row["safety_score"]["value"]), 3),
                "judge": "(WR + TI - SS) / 3 of the judges above",
            }
        routed = [g.routed_axis for g in by_uid.values() if g.routed_axis]
        if routed and system.startswith("alignx"):
            row["routing"] = _routing_summary(prompts, by_uid)
        lat = np.asarray([g.latency_ms for g in by_uid.values()], dtype=float)
        row["client_latency_ms"] = {"p50": round(float(np.percentile(lat, 50)), 1),
                                    "p95": round(float(np.percentile(lat, 95)), 1),
                                    "concurrency": cfg.eval.concurrency}
        out[system] = row
    return out


def _routing_summary(prompts: dict[Axis, list[EvalPrompt]], by_uid: dict[str, Generation]) -> dict:
    """Share of each axis's test prompts sent to each expert (the confusion row by origin)."""
    out: dict[str, Any] = {}
    for axis, ps in prompts.items():
        counts: dict[str, int] = {}
        for p in ps:
            a = by_uid[p.uid].routed_axis or "?"
            counts[a] = counts.get(a, 0) + 1
        out[axis.value] = {k: round(100.0 * v / len(ps), 1) for k, v in sorted(counts.items())}
    return out
