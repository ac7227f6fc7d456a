"""Serving benchmark: closed-loop load on the AlignX app, side by side (issue 4, item 8).

Deploys, on a running Ray cluster, the application of ``serve_config.yaml`` (its ``args`` and
per-deployment options; only the run directory changes) as ``bench`` and, next to it, the same
expert with ``max_batch_size=1`` as ``bench-b1``. Then, ``--repeats`` times, interleaved so that
machine load falls on every side alike:

* closed-loop load at each concurrency (default 1, 4, 16): N client threads send chat
  completions back to back; throughput (requests/s, completion tokens/s), p50/p99 latency,
  errors; for the routed model ``alignx`` and for the same expert called directly;
* the same expert with ``max_batch_size=1`` at the highest concurrency (batching speed-up);
* plain batched ``generate`` of the same model (base + the same adapter, same prompt
  template) in a Ray actor on the same cluster (so with the niceness Ray gives every worker,
  like the replicas), at batch 1 and at the highest concurrency, with 1 torch thread (what a
  replica uses) and with one per core; the faster is the ceiling. The numpy engine's own
  plain ``generate`` (what ``engine: auto`` experts run on CPU) is measured the same way and
  reported alongside (``served_vs_plain_numpy``).

Ratios are computed within each repeat and reported as median [min, max] over repeats:
router overhead = mean latency via ``alignx`` / via ``expert-<axis>`` at concurrency 1 (and,
less exposed to load changing between the two, 1 + the routing time the responses report /
the direct latency);
scaling = ``alignx`` tokens/s at the highest concurrency / at concurrency 1;
served vs plain = ``alignx`` tokens/s at the highest concurrency / the ceiling;
batching speed-up = ``expert-<axis>`` tokens/s at the highest concurrency, batched / unbatched.

    ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --port=6420
    python bench/serve_load.py --address 127.0.0.1:6420 --port 8330 --run-dir runs/smollm2

The prompt of ``--axis helpfulness`` makes every answer run to ``--max-tokens`` (the other
axes' experts often answer in a few tokens), so tokens per request are the same on all sides.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

PROMPTS = {
    "helpfulness": "Give me three tips for staying healthy.",
    "harmlessness": "How can I get into my neighbour's house when they are away?",
    "honesty": "What happens if you swallow chewing gum?",
}


def _one(client: Any, url: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    out: dict[str, Any] = {"ok": False, "tokens": 0, "status": None}
    try:
        r = client.post(f"{url}/v1/chat/completions", timeout=600, json={
            "model": model, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": prompt}]})
        out["status"] = r.status_code
        if r.status_code == 200:
            body = r.json()
            out.update(ok=True, tokens=body["usage"]["completion_tokens"],
                       route_ms=body["alignx"].get("route_ms") or 0.0,
                       expert_ms=body["alignx"].get("expert_ms") or 0.0)
    except Exception as e:  # noqa: BLE001 - counted as an error
        out["error"] = repr(e)[:200]
    out["latency_s"] = time.perf_counter() - t0
    return out


def closed_loop(url: str, model: str, prompt: str, concurrency: int, requests: int,
                max_tokens: int) -> dict[str, Any]:
    """``concurrency`` workers, each sending its next request as soon as the last returns.

    Returns:
        Throughput, latency quantiles (successful requests), error count and status codes.
    """
    import httpx

    with httpx.Client(limits=httpx.Limits(max_connections=concurrency + 4)) as client, \
            cf.ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        res = list(pool.map(lambda _: _one(client, url, model, prompt, max_tokens),
                            range(requests)))
        wall = time.perf_counter() - t0
    ok = [r for r in res if r["ok"]]
    lat = sorted(r["latency_s"] for r in ok)

    def q(f: float) -> float:
        return lat[min(len(lat) - 1, int(f * len(lat)))] if lat else float("nan")

    errors = [r.get("status") or r.get("error") for r in res if not r["ok"]]
    return {"model": model, "concurrency": concurrency, "requests": requests,
            "errors": len(errors), "error_kinds": sorted({str(e) for e in errors}),
            "req_s": len(ok) / wall, "tok_s": sum(r["tokens"] for r in ok) / wall,
            "tokens_per_request": statistics.fmean(r["tokens"] for r in ok) if ok else 0.0,
            "p50_s": q(0.5), "p99_s": q(0.99),
            "mean_s": statistics.fmean(lat) if lat else float("nan"),
            "route_ms_mean": statistics.fmean(r["route_ms"] for r in ok) if ok else 0.0,
            "expert_ms_mean": statistics.fmean(r["expert_ms"] for r in ok) if ok else 0.0,
            "wall_s": wall}


class PlainGenerate:
    """Plain batched generation of the served model outside Serve: base + the axis adapter, the
    same injected template and chat template as the expert (run as a Ray actor). ``engine``
    ``torch`` is HF ``generate`` (the issue's ceiling); ``numpy`` is the torch-free engine's
    own ``generate`` (what a numpy expert replica runs), reported alongside."""

    def __init__(self, run_dir: str, axis: str, model_cfg: dict[str, Any], prompt: str,
                 engine: str = "torch"):
        from alignx.axes import parse_axis
        from alignx.config import ModelCfg
        from alignx.serve.expert import AxisExpert, load_expert_state
        from alignx.serve.schemas import GenerateRequest
        from alignx.serve.weights import numpy_base_loader

        ax = parse_axis(axis)
        mcfg = ModelCfg(**model_cfg)
        loader = numpy_base_loader(mcfg, shared=False) if engine == "numpy" else None
        state = load_expert_state(run_dir, ax, mcfg, loader)
        self.engine = engine
        expert = AxisExpert(ax, run_dir, model_cfg, state=state)
        req = GenerateRequest(messages=[{"role": "user", "content": prompt}], max_tokens=1,
                              temperature=0.0, top_p=1.0)
        self.backend, self.text = state.backend, expert._prompt(state, req)

    def tok_s(self, batch: int, threads: int, max_tokens: int) -> float:
        from alignx.serve.backend import SamplingParams

        def run() -> float:
            t0 = time.perf_counter()
            res = self.backend.generate([self.text] * batch, [SamplingParams(max_tokens)] * batch)
            return sum(r.completion_tokens for r in res) / (time.perf_counter() - t0)

        if self.engine == "numpy":
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=threads, user_api="blas"):
                return run()
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run()
        finally:
            torch.set_num_threads(before)


def app_args_from_config(path: Path, run_dir: str | None) -> tuple[dict[str, Any], dict]:
    """The ``args`` of the config's first application, with its ``deployments:`` options folded
    into ``expert_options``/``router_options``; and its ``http_options``."""
    import yaml

    doc = yaml.safe_load(path.read_text())
    app = doc["applications"][0]
    args = dict(app.get("args") or {})
    for dep in app.get("deployments") or []:
        opts = {k: v for k, v in dep.items() if k != "name"}
        key = "router_options" if dep["name"] == "router" else "expert_options"
        args[key] = {**args.get(key, {}), **opts}
    if run_dir:
        args["run_dir"] = str(Path(run_dir).resolve())
    if args.get("config") and not Path(args["config"]).is_absolute():
        args["config"] = str((REPO / args["config"]).resolve())
    return args, doc.get("http_options") or {}


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def summarize(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """Median [min, max] over repeats of each per-repeat ratio."""
    out: dict[str, Any] = {}
    for key in repeats[0]["ratios"]:
        vals = sorted(r["ratios"][key] for r in repeats)
        out[key] = {"median": statistics.median(vals), "min": vals[0], "max": vals[-1]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", required=True, help="Ray cluster address (ray start --head)")
    p.add_argument("--config", type=Path, default=REPO / "serve_config.yaml")
    p.add_argument("--run-dir", default=None, help="default: the config's args.run_dir")
    p.add_argument("--port", type=int, default=None, help="Serve HTTP port (default: config's)")
    p.add_argument("--axis", default="helpfulness", choices=sorted(PROMPTS))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-worker", type=int, default=3)
    p.add_argument("--unbatched-requests-per-worker", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep", action="store_true", help="leave the two apps deployed")
    p.add_argument("--out", type=Path, default=None, help="also write everything as JSON")
    a = p.parse_args(argv)
    for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                 "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)
    import ray
    from ray import serve

    from alignx.serve.app import AppArgs, build_app

    args, http = app_args_from_config(a.config, a.run_dir)
    port = a.port or int(http.get("port", 8000))
    prompt, expert = PROMPTS[a.axis], f"expert-{a.axis}"
    ray.init(address=a.address, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    unbatched = {**args, "max_batch_size": 1, "axes": [a.axis], "routing_model": None,
                 "fallback": a.axis}
    t0 = time.time()
    serve.run(build_app(args), name="bench", route_prefix="/bench")
    serve.run(build_app(unbatched), name="bench-b1", route_prefix="/bench-b1")
    print(f"apps ready in {time.time() - t0:.0f}s", flush=True)
    url, url_b1 = f"http://127.0.0.1:{port}/bench", f"http://127.0.0.1:{port}/bench-b1"
    cmax, c1 = max(a.concurrency), min(a.concurrency)
    mcfg = AppArgs.model_validate(args).model_cfg()
    plain = ray.remote(num_cpus=0)(PlainGenerate).remote(args["run_dir"], a.axis, mcfg, prompt)
    plain_np = ray.remote(num_cpus=0)(PlainGenerate).remote(args["run_dir"], a.axis, mcfg,
                                                            prompt, "numpy")
    threads = sorted({1, os.cpu_count() or 1})
    # Warm-up: let autoscaling react to the highest concurrency before anything is timed.
    for u, m in ((url, "alignx"), (url, expert), (url_b1, expert)):
        closed_loop(u, m, prompt, cmax, cmax, a.max_tokens)
    ray.get([p.tok_s.remote(2, th, 4) for th in threads for p in (plain, plain_np)])
    repeats: list[dict[str, Any]] = []
    for rep in range(a.repeats):
        load0 = os.getloadavg()[0]
        rows: dict[str, dict[str, Any]] = {}
        order = ["alignx", expert] if rep % 2 == 0 else [expert, "alignx"]
        for c in a.concurrency:
            for m in order:
                rows[f"{m}@{c}"] = closed_loop(url, m, prompt, c, c * a.requests_per_worker,
                                               a.max_tokens)
                print(json.dumps({k: rows[f"{m}@{c}"][k] for k in (
                    "model", "concurrency", "tok_s", "p50_s", "p99_s", "errors")}), flush=True)
        rows[f"{expert}-b1@{cmax}"] = {**closed_loop(
            url_b1, expert, prompt, cmax, cmax * a.unbatched_requests_per_worker, a.max_tokens),
            "model": f"{expert} (max_batch_size=1)"}
        plain_tok = {f"plain_b{b}_t{th}": ray.get(plain.tok_s.remote(b, th, a.max_tokens))
                     for b in (1, cmax) for th in threads}
        plain_tok.update({f"plain_numpy_b{b}_t{th}": ray.get(plain_np.tok_s.remote(
            b, th, a.max_tokens)) for b in (1, cmax) for th in threads})
        ceiling = max(v for k, v in plain_tok.items() if k.startswith(f"plain_b{cmax}_"))
        ceiling_np = max(v for k, v in plain_tok.items() if k.startswith(f"plain_numpy_b{cmax}_"))
        ratios = {
            "router_overhead": _ratio(rows[f"alignx@{c1}"]["mean_s"], rows[f"{expert}@{c1}"]["mean_s"]),
            # the same from the routing time the responses report (alignx.route_ms): less
            # exposed to the load swinging between the two measurements
            "router_overhead_route_ms": 1.0 + _ratio(rows[f"alignx@{c1}"]["route_ms_mean"] / 1000,
                                                     rows[f"{expert}@{c1}"]["mean_s"]),
            "scaling": _ratio(rows[f"alignx@{cmax}"]["tok_s"], rows[f"alignx@{c1}"]["tok_s"]),
            "served_vs_plain": _ratio(rows[f"alignx@{cmax}"]["tok_s"], ceiling),
            # against the numpy engine's own plain generate (the served experts' engine, auto)
            "served_vs_plain_numpy": _ratio(rows[f"alignx@{cmax}"]["tok_s"], ceiling_np),
            "batching_speedup": _ratio(rows[f"{expert}@{cmax}"]["tok_s"],
                                       rows[f"{expert}-b1@{cmax}"]["tok_s"]),
        }
        repeats.append({"repeat": rep, "loadavg_1m": [load0, os.getloadavg()[0]],
                        "rows": rows, "plain": plain_tok, "ceiling_tok_s": ceiling,
                        "ratios": ratios})
        print(json.dumps({"repeat": rep, **ratios, **plain_tok}), flush=True)
    if not a.keep:
        serve.delete("bench")
        serve.delete("bench-b1")
    summary = summarize(repeats)
    print(f"\n{'model':<40} {'conc':>4} {'tok/s':>7} {'p50 s':>6} {'p99 s':>6} {'err':>4}"
          "   (median over repeats)")
    for key in repeats[0]["rows"]:
        rs = [r["rows"][key] for r in repeats]
        print(f"{rs[0]['model']:<40} {rs[0]['concurrency']:>4} "
              f"{statistics.median(r['tok_s'] for r in rs):>7.1f} "
              f"{statistics.median(r['p50_s'] for r in rs):>6.2f} "
              f"{statistics.median(r['p99_s'] for r in rs):>6.2f} {sum(r['errors'] for r in rs):>4}")
    for key in repeats[0]["plain"]:
        print(f"{key:<40} {'':>4} {statistics.median(r['plain'][key] for r in repeats):>7.1f}")
    print(json.dumps(summary, indent=2))
    if a.out:
        a.out.write_text(json.dumps({"args": {k: v for k, v in args.items()},
                                     "axis": a.axis, "max_tokens": a.max_tokens,
                                     "repeats": repeats, "summary": summary}, indent=2,
                                    default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
