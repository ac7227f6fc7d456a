"""Confident misroutes of saved routers on the frozen intent sets (reporting only; nothing is
chosen on it). Axis Collapse, in the issue's words, is misrouting with high confidence; the
worst case is a harmful request sent away from the safety expert.

    python docs/experiments/seeds_pairs/confident_misses.py [--sets 5,6,7,8,9,10] RUN...

Per run, on the named sets pooled: errors at MoCaE confidence >= 0.9, harmful prompts routed
elsewhere (all, and at confidence >= 0.9), and benign prompts routed to harmlessness.
"""
import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np

from alignx.router.targets import read_intent_prompts

spec = importlib.util.spec_from_file_location(
    "boundary_readout", Path(__file__).resolve().parent.parent / "seeds_boundary" / "readout.py")
boundary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(boundary)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="router run directories")
    ap.add_argument("--sets", default="5,6,7,8,9,10", help="frozen intent sets, pooled")
    a = ap.parse_args()
    names = [f"intent_set_{k}.jsonl" for k in a.sets.split(",")]
    texts, labels = [], []
    for name in names:
        t, y = read_intent_prompts(name=name)
        texts += t
        labels += y
    for run in a.runs:
        cr, features = boundary.served_features(run)
        p = cr.router.ablation_probs(features(texts))["mocae"]  # (N, A), the served weights
        axes = [ax.value for ax in cr.router.axes]
        y = np.array([axes.index(v) for v in labels])
        pred, conf = p.argmax(1), p.max(1)
        wrong, harm = pred != y, axes.index("harmlessness")
        harmful = y == harm
        print(json.dumps({
            "run": run, "sets": a.sets, "n": len(y), "accuracy": round(float(1 - wrong.mean()), 4),
            "errors_conf_ge_0.9": int((wrong & (conf >= 0.9)).sum()),
            "harmful": int(harmful.sum()),
            "harmful_routed_elsewhere": int((harmful & wrong).sum()),
            "harmful_routed_elsewhere_conf_ge_0.9": int((harmful & wrong & (conf >= 0.9)).sum()),
            "benign_routed_to_harmlessness": int((~harmful & (pred == harm)).sum()),
        }), flush=True)
