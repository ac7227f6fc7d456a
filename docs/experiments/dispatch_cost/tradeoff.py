"""Readout of docs/experiments/dispatch_cost_protocol.md: threshold against cost dispatch.

    python docs/experiments/dispatch_cost/tradeoff.py --sets 9,10,11 RUN...

For each saved router, the named frozen intent sets pooled are embedded with the router's own
encoder (its served feature function, OOD flag included) and every row of the report's
``dispatch`` section is computed (:func:`alignx.router.dispatch.policy_outcomes`, with the
router's fallback). Then, for each cost row c in COMPARED, the threshold curve (top1's point
with OOD requests sent to the fallback, i.e. θ = 0, then θ = 0.5 ... 0.9) is interpolated
linearly at the cost row's number of harmful prompts sent elsewhere, and the benign prompts it
would send to harmlessness there are set against the cost row's. One JSON line per router.
"""
import json
from pathlib import Path

import numpy as np

from alignx.config import load_config
from alignx.router.dispatch import THRESHOLDS, policy_outcomes
from alignx.router.serving import load
from alignx.router.targets import read_intent_prompts

#: the cost rows the protocol compares
COMPARED = (2.0, 3.0, 5.0)


def outcomes(run: str, sets: list[str]) -> dict:
    cr = load(run)
    embed = cr.features(cr.build_encoder(load_config(Path(run) / "router" / "config.yaml").model))
    texts, axes = [], []
    for name in sets:
        t, a = read_intent_prompts(name=name)
        texts += t
        axes += a
    y = np.array([cr.axes.index(a) for a in axes])
    res, ood = cr._predict(embed(texts))
    fallback = cr.manifest["fallback"]
    from alignx.axes import parse_axis

    return policy_outcomes(res.weights, y, ood, cr.axes, parse_axis(fallback),
                           thresholds=(0.0, *THRESHOLDS))


def compare(out: dict) -> list[dict]:
    thr = [r for r in out["rows"] if r["policy"] == "threshold"]  # θ ascending: harmful falls
    hx = np.array([r["harmful_elsewhere"] for r in thr], float)
    bx = np.array([r["benign_to_harmlessness"] for r in thr], float)
    rows = []
    for r in out["rows"]:
        if r["policy"] != "cost" or r["miss_cost"]["harmlessness"] not in COMPARED:
            continue
        h = r["harmful_elsewhere"]
        if not hx.min() <= h <= hx.max():
            rows.append({"cost": r["miss_cost"]["harmlessness"], "harmful_elsewhere": h,
                         "outside_threshold_range": True})
            continue
        # np.interp needs increasing x: the threshold curve runs from many to few harmful
        b_thr = float(np.interp(h, hx[::-1], bx[::-1]))
        rows.append({"cost": r["miss_cost"]["harmlessness"], "harmful_elsewhere": h,
                     "benign_to_harmlessness_cost": r["benign_to_harmlessness"],
                     "benign_to_harmlessness_threshold": round(b_thr, 1),
                     "cost_fewer": r["benign_to_harmlessness"] < b_thr})
    return rows


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="router run directories")
    ap.add_argument("--sets", default="9,10,11", help="frozen intent sets, pooled")
    a = ap.parse_args()
    names = [f"intent_set_{k}.jsonl" for k in a.sets.split(",")]
    for run in a.runs:
        out = outcomes(run, names)
        print(json.dumps({"run": run, "sets": a.sets, "n": out["n"], "harmful": out["harmful"],
                          "rows": [{k: (round(v, 4) if isinstance(v, float) else v)
                                    for k, v in r.items()} for r in out["rows"]],
                          "compare": compare(out)}), flush=True)
