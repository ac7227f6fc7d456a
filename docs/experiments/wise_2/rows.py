"""Every ablation row of saved routers on shipped hand-labelled sets, embedded with each
router's own saved encoder (``seeds_boundary/readout.served_features``): for a set a router's
report lacks, as the twelfth set for the W38 routers of this round, calibrated before it was
an evaluation set.

    python docs/experiments/wise_2/rows.py --sets intent_set_12 RUN...
"""
import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np

from alignx.router.targets import read_intent_prompts

D = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("readout", D / "seeds_boundary" / "readout.py")
readout = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readout)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="router run directories")
    ap.add_argument("--sets", required=True, help="comma-separated set names, without .jsonl")
    ap.add_argument("--rows", default="raw_softmax,mocae", help="ablation rows to print")
    a = ap.parse_args()
    for run in a.runs:
        cr, features = readout.served_features(run)
        out = {"run": run}
        for name in a.sets.split(","):
            texts, axes = read_intent_prompts(name=f"{name}.jsonl")
            y = np.array([cr.axes.index(ax) for ax in axes])
            rows = cr.router.evaluate(features(texts), y)
            out[name] = {r: {m: round(rows[r][m], 4) for m in ("accuracy", "ece")}
                         for r in a.rows.split(",")}
        print(json.dumps(out), flush=True)
