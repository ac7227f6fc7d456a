"""Engine benchmark: the torch-free numpy engine against HF ``generate``, side by side.

In one process, one thread each (what an expert replica uses), on the same model, adapter and
prompt, interleaved over ``--repeats``:

* plain batched generation at batch 1 and ``--batch`` (tokens/s), ``transformers`` ``generate``
  (``HFBackend``) and ``NumpyBackend``; greedy, so both produce the same tokens (checked);
* the weight-layout choice of the numpy engine: ``x @ W_t`` with ``W_t`` stored ``(in, out)``
  against ``x @ W.T`` on the ``(out, in)`` weight, for SmolLM2's MLP and LM-head shapes.

    python bench/npengine_speed.py --run-dir runs/smollm2          # ~3 min on 2 cores
    python bench/npengine_speed.py --model tiny-llama               # no run dir: the base model
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Give me three tips for staying healthy."


def _best(f, n: int) -> float:
    f()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def layout(d: int, d_ff: int, vocab: int, batches: list[int]) -> list[dict]:
    """ms per multiply, both layouts, per batch size (best of several)."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for name, (i, o) in {"mlp": (d, d_ff), "lm_head": (d, vocab)}.items():
        w = rng.standard_normal((o, i), dtype=np.float32)
        wt = np.ascontiguousarray(w.T)
        for b in batches:
            x = rng.standard_normal((b, i), dtype=np.float32)
            n = 20 if name == "mlp" else 5
            a = _best(lambda: x @ w.T, n) * 1e3  # noqa: B023
            t = _best(lambda: x @ wt, n) * 1e3  # noqa: B023
            out.append({"shape": name, "batch": b, "x@W.T_ms": a, "x@W_t_ms": t, "speedup": a / t})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--run-dir", default=None, help="use its helpfulness adapter (default: none)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)

    import torch
    from threadpoolctl import threadpool_limits

    from alignx.config import ModelCfg
    from alignx.serve.backend import HFBackend, SamplingParams
    from alignx.serve.npengine import NumpyBackend
    from alignx.serve.weights import numpy_base_loader

    torch.set_num_threads(a.threads)
    threadpool_limits(limits=a.threads, user_api="blas")
    mcfg = ModelCfg(name=a.model)
    if a.run_dir:
        from alignx.axes import Axis
        from alignx.serve.expert import load_expert_state

        hf = load_expert_state(a.run_dir, Axis.HELPFULNESS, mcfg).backend
        npb = load_expert_state(a.run_dir, Axis.HELPFULNESS, mcfg,
                                numpy_base_loader(mcfg, shared=False)).backend
    else:
        from alignx.modeling import load_base

        hf = HFBackend(*load_base(mcfg, use_gpu=False))
        npb = NumpyBackend(*numpy_base_loader(mcfg, shared=False)())
    text = hf.tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                      add_generation_prompt=True)
    rows: dict[str, list[float]] = {}
    for rep in range(a.repeats):
        for b in (1, a.batch):
            order = [("torch", hf), ("numpy", npb)] if rep % 2 == 0 else [("numpy", npb),
                                                                          ("torch", hf)]
            outs = {}
            for name, be in order:
                t0 = time.perf_counter()
                res = be.generate([text] * b, [SamplingParams(a.max_tokens)] * b)
                dt = time.perf_counter() - t0
                rows.setdefault(f"{name}_b{b}", []).append(
                    sum(r.completion_tokens for r in res) / dt)
                outs[name] = res
            if outs["torch"] != outs["numpy"]:
                print("warning: the engines' greedy outputs differ", file=sys.stderr)
            print(json.dumps({"repeat": rep, "batch": b, **{k: round(v[-1], 1) for k, v in
                                                            rows.items() if k.endswith(f"_b{b}")}}),
                  flush=True)
    ratios = {f"numpy/torch b{b}": [n / t for n, t in zip(rows[f"numpy_b{b}"], rows[f"torch_b{b}"],
                                                           strict=True)]
              for b in (1, a.batch)}
    cfg = npb.model.cfg
    lay = layout(cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, [1, 4, a.batch])
    print(f"\nplain generate, {a.model}, {a.max_tokens} new tokens, {a.threads} thread(s), "
          f"median of {a.repeats} (tokens/s)")
    for k, v in rows.items():
        print(f"  {k:<12} {statistics.median(v):7.1f}   [{min(v):.1f}, {max(v):.1f}]")
    for k, v in ratios.items():
        print(f"  {k:<16} {statistics.median(v):.2f}   [{min(v):.2f}, {max(v):.2f}]")
    print("\nweight layout, ms per multiply (best of several)")
    for r in lay:
        print(f"  {r['shape']:<8} b{r['batch']:<3} x@W.T {r['x@W.T_ms']:7.3f}  x@W_t "
              f"{r['x@W_t_ms']:7.3f}  {r['speedup']:.2f}x")
    if a.out:
        a.out.write_text(json.dumps({"args": vars(a) | {"out": str(a.out)}, "tok_s": rows,
                                     "ratios": ratios, "layout": lay}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
