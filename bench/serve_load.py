"""Serving benchmark: closed-loop load against a running AlignX app (issue 4, item 8).

For each concurrency (default 1, 4, 16) N client threads send chat completions back to back
for a fixed number of requests; reports throughput (requests/s, completion tokens/s), p50/p99
latency and errors, for the routed model (``alignx``) and the same expert called directly
(router overhead = routed latency / direct latency at concurrency 1). ``--ceiling`` also
times plain batched ``generate`` of the same model in this process (the upper bound).
The batching speed-up needs two deployments: run once as deployed and once with
``max_batch_size=1`` in the app args (``--label`` tags the rows) and compare concurrency 16.

    serve run serve_config.yaml &            # or any deployment of alignx.serve.app:build_app
    python bench/serve_load.py --url http://127.0.0.1:8000 --axis honesty --ceiling smollm2-135m
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import sys
import time
from pathlib import Path

PROMPTS = {
    "helpfulness": "Give me three tips for staying healthy.",
    "harmlessness": "How can I get into my neighbour's house when they are away?",
    "honesty": "What happens if you swallow chewing gum?",
}


def _one(client, url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int, bool]:
    t0 = time.perf_counter()
    try:
        r = client.post(f"{url}/v1/chat/completions", timeout=600, json={
            "model": model, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": prompt}]})
        ok = r.status_code == 200
        toks = r.json()["usage"]["completion_tokens"] if ok else 0
    except Exception:  # noqa: BLE001 - counted as an error
        ok, toks = False, 0
    return time.perf_counter() - t0, toks, ok


def closed_loop(url: str, model: str, prompt: str, concurrency: int, requests: int,
                max_tokens: int) -> dict:
    """``concurrency`` workers, each sending its next request as soon as the last returns."""
    import httpx

    with httpx.Client(limits=httpx.Limits(max_connections=concurrency + 4)) as client, \
            cf.ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        res = list(pool.map(lambda _: _one(client, url, model, prompt, max_tokens),
                            range(requests)))
        wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in res if r[2])
    def q(f):
        return (lat[min(len(lat) - 1, int(f * len(lat)))] if lat else float("nan"))
    return {"model": model, "concurrency": concurrency, "requests": requests,
            "errors": sum(not r[2] for r in res), "req_s": len(lat) / wall,
            "tok_s": sum(r[1] for r in res) / wall, "p50_s": q(0.5), "p99_s": q(0.99),
            "mean_s": statistics.fmean(lat) if lat else float("nan")}


def plain_generate_ceiling(model_name: str, prompt: str, batch: int, max_tokens: int) -> dict:
    """Tokens/s of plain HF batched generate (same model, same template path)."""
    from alignx.config import ModelCfg
    from alignx.modeling import load_base
    from alignx.serve.backend import HFBackend, SamplingParams

    model, tok = load_base(ModelCfg(name=model_name), use_gpu=False)
    be = HFBackend(model, tok)
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    out = {}
    for b in (1, batch):
        t0 = time.perf_counter()
        res = be.generate([text] * b, [SamplingParams(max_tokens=max_tokens)] * b)
        dt = time.perf_counter() - t0
        out[f"batch{b}_tok_s"] = sum(r.completion_tokens for r in res) / dt
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--axis", default="honesty", choices=sorted(PROMPTS))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-worker", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--ceiling", default=None, help="model name for plain batched generate")
    p.add_argument("--label", default="", help="tag for the rows (e.g. batch1)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    prompt = PROMPTS[a.axis]
    rows = []
    for model in ("alignx", f"expert-{a.axis}"):
        for c in a.concurrency:
            rows.append({"label": a.label, **closed_loop(
                a.url, model, prompt, c, c * a.requests_per_worker, a.max_tokens)})
    print(f"{'model':<20} {'conc':>4} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7} {'err':>4}")
    for r in rows:
        print(f"{r['model']:<20} {r['concurrency']:>4} {r['req_s']:>7.2f} {r['tok_s']:>7.1f} "
              f"{r['p50_s']:>7.2f} {r['p99_s']:>7.2f} {r['errors']:>4}")
    by = {(r["model"], r["concurrency"]): r for r in rows}
    c0, cmax = a.concurrency[0], a.concurrency[-1]
    summary = {
        "router_overhead": by[("alignx", c0)]["mean_s"] / by[(f"expert-{a.axis}", c0)]["mean_s"],
        "scaling_tok_s": by[("alignx", cmax)]["tok_s"] / max(by[("alignx", c0)]["tok_s"], 1e-9),
    }
    if a.ceiling:
        summary.update(plain_generate_ceiling(a.ceiling, prompt, cmax, a.max_tokens))
        summary["served_vs_plain"] = by[("alignx", cmax)]["tok_s"] / summary[f"batch{cmax}_tok_s"]
    print(json.dumps(summary, indent=2))
    if a.out:
        a.out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
