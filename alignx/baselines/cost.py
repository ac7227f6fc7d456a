"""Cost per system: latency per request and peak memory, on the same prompts (METHOD.md).

The paper claims over 35% less latency and memory than prior MoE methods (H3Fusion). This
module measures it, like with like: every system runs in its **own fresh Python process**
(``python -m alignx.baselines.cost``), loads what it needs, generates the same prompts one
request at a time with the same ``max_tokens`` (greedy) through the serving code's own
generation backend (:class:`~alignx.serve.backend.HFBackend`, the expert path), and reports

* ``latency_ms_p50`` / ``latency_ms_p95``: wall time per request, prompt to last token,
  routing included (after one warm-up request that is not counted);
* ``ms_per_token``: total time over total generated tokens (systems that stop earlier at EOS
  have cheaper requests; this evens that out);
* ``cpu_ms_p50`` / ``cpu_ms_per_token``: the CPU time the process spent per request
  (``time.process_time``), which other jobs on a shared machine inflate far less than wall
  time (with one thread it is the request's compute);
* ``peak_rss_mib``: the process's peak resident set (``VmHWM`` of ``/proc/self/status``),
  which includes what every process pays to import torch/transformers. Not
  ``getrusage().ru_maxrss``: Linux carries that over ``execve`` from the process that forked
  the worker, so a worker started by a 3 GiB driver reported 3 GiB for every system. And
  ``rss_mib``: the resident set after the requests;
* ``weights_mib``: bytes of the distinct tensors the system holds (base, adapters, gates; for
  the routed systems also the sentence encoder and the router's arrays).

What each system is in process:

* ``alignx`` / ``alignx-softmax``: the router (sentence encoder + the calibrated MoCaE
  router, or its raw softmax) and **one** base model carrying the three axis adapters
  (PEFT multi-adapter; the chosen adapter is activated per request, its axis template
  injected). This is the memory the Serve deployment needs per node, where the three expert
  replicas share one copy of the base weights through the object store
  (:mod:`alignx.serve.weights`), without the per-replica process overhead of Serve;
* ``base``, ``multitask``, ``h3fusion``, ``expert-<axis>``:
  :func:`alignx.baselines.systems.load_system`, the loader the Serve deployments use.

Threads are pinned (``threads``, default 1, as in a Serve replica), so the numbers compare
compute, not how many cores a process grabbed. A shared machine adds noise: ``rounds`` > 1
interleaves the systems and pools their requests.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alignx.axes import Axis

log = logging.getLogger(__name__)

#: The systems compared by default (the evaluation's systems).
COST_SYSTEMS = ("alignx", "alignx-softmax", "base", "multitask", "h3fusion")
_RESULT = "ALIGNX_COST_RESULT "
#: The relative reduction the paper claims over prior MoEs.
CLAIMED_REDUCTION = 0.35


def cost_prompts(run_dir: str | Path, axes: Sequence[Axis], n: int) -> list[list[dict[str, str]]]:
    """``n`` test conversations taken round-robin from the axes' prepared test splits.

    Raises:
        ArtifactNotFoundError: an axis has no prepared data.
        ValueError: the test splits hold no prompt.
    """
    from alignx.data.prepare import load_split

    per = [[r["messages"] for r in load_split(run_dir, a, "test")] for a in axes]
    out: list[list[dict[str, str]]] = []
    for i in range(max((len(p) for p in per), default=0)):
        out += [p[i] for p in per if i < len(p)]
        if len(out) >= n:
            return out[:n]
    if not out:
        raise ValueError(f"no test prompts in {run_dir}/data; run `alignx prepare` first")
    return out


# ----------------------------------------------------------------------------- in the worker


def _tensor_bytes(*modules: Any) -> int:
    """Bytes of the distinct tensors (parameters and buffers) of torch modules."""
    seen: dict[int, int] = {}
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            if t.device.type != "meta":
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


class _RoutedSystem:
    """AlignX in one process: router + one base model with every axis adapter (PEFT)."""

    def __init__(self, run_dir: str | Path, model_cfg: Any, calibrated: bool):
        from peft import PeftModel

        from alignx.artifacts import ArtifactLayout, check_same_base
        from alignx.baselines.systems import expert_system
        from alignx.modeling import base_model_id, load_base
        from alignx.router.serving import load
        from alignx.serve.backend import HFBackend

        self.router = load(run_dir)
        check_same_base(base_model_id(model_cfg), self.router.base_model, "the router")
        self.encoder = self.router.build_encoder(model_cfg)
        self.embed = self.router.features(self.encoder)  # the served feature function
        self.calibrated = calibrated
        layout = ArtifactLayout(run_dir)
        self.router_dir = layout.root / "router"
        base, self.tok = load_base(model_cfg)
        self.systems: dict[Axis, str | None] = {}
        model = None
        for a in self.router.axes:
            m = layout.load_adapter_manifest(a)
            check_same_base(base_model_id(model_cfg), m.base_model, f"adapter {a.value!r}")
            self.systems[a] = expert_system(m)[1]
            if model is None:
                model = PeftModel.from_pretrained(base, str(layout.adapter_dir(a)),
                                                  adapter_name=a.value, is_trainable=False)
            else:
                model.load_adapter(str(layout.adapter_dir(a)), adapter_name=a.value,
                                   is_trainable=False)
        assert model is not None
        model.eval()
        self.model = model
        self.backend = HFBackend(model, self.tok)
        man = self.router.manifest
        self.policy = (man.get("policy", "top1"), man.get("threshold", 0.5),
                       Axis(man.get("fallback", self.router.axes[0].value)))

    def weights_bytes(self) -> int:
        from alignx.router.mocae import WEIGHTS_FILE

        enc = getattr(self.encoder, "model", None)
        router_arrays = (self.router_dir / WEIGHTS_FILE).stat().st_size  # all its arrays
        return _tensor_bytes(self.model, *([enc] if enc is not None else [])) + router_arrays

    def generate(self, messages: list[dict[str, str]], params: Any) -> Any:
        from alignx.data.injection import inject_system
        from alignx.router.features import router_text
        from alignx.serve.router import choose_axis

        h = self.embed([router_text(messages, self.router.manifest.get("context_turns", 0))])
        info = (self.router.route(h) if self.calibrated else self.router.route_softmax(h))[0]
        axis = choose_axis(info, *self.policy, self.router.axes)
        self.model.set_adapter(axis.value)
        system = self.systems[axis]
        msgs = inject_system(messages, system) if system else messages
        prompt = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return self.backend.generate([prompt], [params])[0]


class _PlainSystem:
    """A system of :func:`alignx.baselines.systems.load_system` behind the serving backend."""

    def __init__(self, name: str, run_dir: str | Path, model_cfg: Any):
        from alignx.baselines.systems import load_system
        from alignx.serve.backend import HFBackend

        self.sys = load_system(name, run_dir, model_cfg)
        self.backend = HFBackend(self.sys.model, self.sys.tokenizer)

    def weights_bytes(self) -> int:
        return _tensor_bytes(self.sys.model)

    def generate(self, messages: list[dict[str, str]], params: Any) -> Any:
        return self.backend.generate([self.sys.prompt(messages)], [params])[0]


def _current_rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    """This process's own peak resident set (``VmHWM``), which ``execve`` resets.

    ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used: Linux keeps it across ``execve``, so a
    fresh worker would report its parent's (forked) resident set whenever that was larger.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no procfs (not Linux)


def measure_in_process(name: str, run_dir: str | Path, model_cfg: dict[str, Any],
                       prompts: list[list[dict[str, str]]], max_tokens: int,
                       threads: int = 1) -> dict[str, Any]:
    """Load one system in *this* process and time it on ``prompts`` (the worker's body).

    Use :func:`measure_costs` instead: peak RSS is only meaningful in a fresh process.

    Returns:
        ``{latencies_ms, cpu_ms, completion_tokens, load_s, peak_rss_mib, rss_mib, weights_mib}``.
    """
    import torch

    from alignx.config import ModelCfg
    from alignx.serve.backend import SamplingParams

    torch.set_num_threads(threads)
    mcfg = ModelCfg(**model_cfg)
    t0 = time.perf_counter()
    if name in ("alignx", "alignx-softmax"):
        system: Any = _RoutedSystem(run_dir, mcfg, calibrated=name == "alignx")
    else:
        system = _PlainSystem(name, run_dir, mcfg)
    load_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=max_tokens)
    system.generate(prompts[0], params)  # warm-up (lazy inits), not counted
    lat, cpu, toks = [], [], []
    for msgs in prompts:
        t, c = time.perf_counter(), time.process_time()
        out = system.generate(msgs, params)
        lat.append((time.perf_counter() - t) * 1000)
        cpu.append((time.process_time() - c) * 1000)
        toks.append(out.completion_tokens)
    return {"latencies_ms": lat, "cpu_ms": cpu, "completion_tokens": toks, "load_s": load_s,
            "peak_rss_mib": _peak_rss_mib(),
            "rss_mib": _current_rss_mib(), "weights_mib": system.weights_bytes() / 2**20}


def _worker_main() -> None:
    spec = json.loads(sys.stdin.read())
    res = measure_in_process(spec["name"], spec["run_dir"], spec["model_cfg"], spec["prompts"],
                             spec["max_tokens"], spec["threads"])
    print(_RESULT + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- the driver


def _run_worker(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(spec["threads"])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run([sys.executable, "-m", "alignx.baselines.cost"], input=json.dumps(spec),
                          capture_output=True, text=True, env=env, timeout=timeout_s)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
    raise RuntimeError(f"cost worker for {spec['name']!r} failed (exit {proc.returncode}):\n  "
                       + "\n  ".join(tail))


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    lat = np.array([x for r in runs for x in r["latencies_ms"]])
    cpu = np.array([x for r in runs for x in r["cpu_ms"]])
    toks = np.array([x for r in runs for x in r["completion_tokens"]])
    return {
        "requests": int(lat.size),
        "latency_ms_p50": float(np.percentile(lat, 50)),
        "latency_ms_p95": float(np.percentile(lat, 95)),
        "latency_ms_mean": float(lat.mean()),
        "completion_tokens_mean": float(toks.mean()),
        "ms_per_token": float(lat.sum() / max(int(toks.sum()), 1)),
        "cpu_ms_p50": float(np.percentile(cpu, 50)),
        "cpu_ms_per_token": float(cpu.sum() / max(int(toks.sum()), 1)),
        "peak_rss_mib": float(np.median([r["peak_rss_mib"] for r in runs])),
        "rss_mib": float(np.median([r["rss_mib"] for r in runs])),
        "weights_mib": float(runs[0]["weights_mib"]),
        "load_s": float(np.median([r["load_s"] for r in runs])),
    }


def _reduction(ours: float, theirs: float) -> float:
    return 1.0 - ours / theirs if theirs > 0 else float("nan")


def claim_check(systems: dict[str, dict[str, Any]], ours: str = "alignx",
                prior: str = "h3fusion") -> dict[str, Any] | None:
    """AlignX's relative reductions against the token-level MoE and whether each reaches 35%.

    Returns:
        ``{metric: {ours, prior, reduction, meets_claim}}`` for p50 latency, ms per token, CPU
        ms (p50, per token), peak RSS and weights, or ``None`` when either was not measured.
    """
    if ours not in systems or prior not in systems:
        return None
    out = {}
    for k in ("latency_ms_p50", "ms_per_token", "cpu_ms_p50", "cpu_ms_per_token", "peak_rss_mib",
              "weights_mib"):
        a, b = systems[ours][k], systems[prior][k]
        red = _reduction(a, b)
        out[k] = {ours: a, prior: b, "reduction": red, "meets_claim": bool(red > CLAIMED_REDUCTION)}
    return out


def _claim_text(check: dict[str, Any] | None) -> str:
    if check is None:
        return ""
    parts = [f"{k}: {v['reduction'] * 100:+.1f}% ({'meets' if v['meets_claim'] else 'misses'})"
             for k, v in check.items()]
    return ("Paper claim: >35% less latency and memory than prior MoEs. AlignX vs the "
            "H3Fusion-style token MoE, reduction (positive = AlignX cheaper): " + "; ".join(parts))


def measure_costs(
    run_dir: str | Path,
    model_cfg: Any,
    systems: Sequence[str] = COST_SYSTEMS,
    prompts: list[list[dict[str, str]]] | None = None,
    *,
    n_prompts: int = 8,
    axes: Sequence[Axis] | None = None,
    max_tokens: int = 64,
    threads: int = 1,
    rounds: int = 1,
    timeout_s: float = 1800.0,
) -> dict[str, Any]:
    """Latency and memory of each system, each measured in a fresh subprocess.

    Args:
        run_dir: a trained run (adapters; the router for ``alignx*``; gates for ``h3fusion``).
        model_cfg: the base model section (``ModelCfg`` or its dict).
        systems: any of ``alignx``, ``alignx-softmax``, ``base``, ``multitask``, ``h3fusion``,
            ``expert-<axis>``.
        prompts: the conversations; default :func:`cost_prompts` (``n_prompts`` test prompts
            round-robin over ``axes``, default every axis).
        n_prompts: see ``prompts``.
        axes: see ``prompts``.
        max_tokens: new-token cap per request (greedy), the same for every system.
        threads: torch threads per process.
        rounds: repetitions, interleaved across systems (requests pooled, memory medians).
        timeout_s: per-process limit.

    Returns:
        ``{"method", "claim", "settings", "systems": {name: summary}, "comparison"}``; each
        summary has ``latency_ms_p50``, ``latency_ms_p95``, ``ms_per_token``,
        ``peak_rss_mib``, ``rss_mib``, ``weights_mib``, ``completion_tokens_mean``, ...

    Raises:
        ValueError: an unknown system name, or ``rounds`` < 1.
        RuntimeError: a worker failed (its stderr tail is in the message; e.g. missing gates).
    """
    from alignx.axes import AXES
    from alignx.baselines.systems import parse_system

    mcfg = model_cfg if isinstance(model_cfg, dict) else model_cfg.model_dump(mode="json")
    names = [s if s in ("alignx", "alignx-softmax") else parse_system(s) for s in systems]
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if prompts is None:
        prompts = cost_prompts(run_dir, list(axes or AXES), n_prompts)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names:
            log.info("cost: %s (round %d/%d, %d prompts)", n, r + 1, rounds, len(prompts))
            runs[n].append(_run_worker({"name": n, "run_dir": str(run_dir), "model_cfg": mcfg,
                                        "prompts": prompts, "max_tokens": max_tokens,
                                        "threads": threads}, timeout_s))
    summaries = {n: _summary(v) for n, v in runs.items()}
    check = claim_check(summaries)
    method = (
        f"Each system in its own fresh process, {len(prompts)} test prompts (round-robin over "
        f"the axes) x {rounds} round(s), one request at a time, greedy, max_tokens={max_tokens}, "
        f"{threads} torch thread(s), on {mcfg.get('name')}; latency = wall time per request "
        "including routing (after one warm-up request); peak RSS = VmHWM of the worker "
        "process (imports included); weights = distinct tensor bytes. AlignX = router + one "
        "base with its three adapters (PEFT multi-adapter), the per-node memory of the Serve "
        "deployment whose expert replicas share the base weights.")
    return {"method": method, "claim": _claim_text(check),
            "settings": {"model": mcfg.get("name"), "run_dir": str(run_dir),
                         "prompts": len(prompts), "rounds": rounds, "max_tokens": max_tokens,
                         "threads": threads},
            "systems": summaries, "comparison": check}


def format_costs(costs: dict[str, Any]) -> str:
    """A plain-text table of :func:`measure_costs`' result."""
    cols = [("latency_ms_p50", "p50 ms"), ("latency_ms_p95", "p95 ms"), ("ms_per_token", "ms/tok"),
            ("cpu_ms_p50", "CPU p50 ms"), ("cpu_ms_per_token", "CPU ms/tok"),
            ("completion_tokens_mean", "tokens"), ("peak_rss_mib", "peak RSS MiB"),
            ("weights_mib", "weights MiB")]
    lines = ["system".ljust(16) + "".join(t.rjust(14) for _, t in cols)]
    for name, s in costs["systems"].items():
        lines.append(name.ljust(16) + "".join(f"{s[k]:14.1f}" for k, _ in cols))
    if costs.get("claim"):
        lines += ["", costs["claim"]]
    return "\n".join(lines)


if __name__ == "__main__":
    _worker_main()
