"""Readout of docs/experiments/seeds_boundary_protocol.md: MoCaE accuracy / ECE of saved routers.

    python docs/experiments/seeds_boundary/readout.py ROUTER_RUN_DIR...            # decision data
    python docs/experiments/seeds_boundary/readout.py --set-7 ROUTER_RUN_DIR...    # + the measurement

Test split and intent validation come from each router's own report. Sets 5 and 6, pooled,
and (with --set-7) the seventh set are embedded here with the router's saved encoder through
its served feature function, so W routers and X routers are scored the same way. The per-set
figures recomputed here are checked against the report's (they must agree).
"""
import json
import sys
from pathlib import Path

import numpy as np

from alignx.config import load_config
from alignx.router.serving import load
from alignx.router.targets import read_intent_prompts

args = sys.argv[1:]
with_7 = "--set-7" in args
runs = [a for a in args if a != "--set-7"]
sets = ["intent_set_5.jsonl", "intent_set_6.jsonl"] + (["intent_set_7.jsonl"] if with_7 else [])
for run in runs:
    cr = load(run)
    report = json.loads((Path(run) / "router" / "router_report.json").read_text())
    model_cfg = load_config(Path(run) / "router" / "config.yaml").model
    embed = cr.features(cr.build_encoder(model_cfg))
    out = {"run": run, "test": report["test_origin_labels"]["mocae"],
           "intent_validation": report["intent_validation"]["mocae"]}
    data = {}
    for name in sets:
        texts, axes = read_intent_prompts(name=name)
        h, _ = cr.split(embed(texts))
        data[name] = (h, np.array([cr.axes.index(a) for a in axes]))
        out[name.removesuffix(".jsonl")] = cr.router.evaluate(*data[name])["mocae"]
    for key in ("intent_set_5", "intent_set_6"):
        if key not in report:  # a router calibrated before the set was an evaluation set
            continue
        mine, theirs = out[key], report[key]["mocae"]
        # routers calibrated before the served feature function embed through
        # sentence-transformers; the two agree to float rounding, so at most a prompt moves
        n = len(data[key + ".jsonl"][1])
        assert abs(mine["accuracy"] - theirs["accuracy"]) <= 1.5 / n, (key, mine, theirs)
        assert abs(mine["ece"] - theirs["ece"]) < 2e-3, (key, mine["ece"], theirs["ece"])
    h56 = np.concatenate([data[n][0] for n in sets[:2]])
    y56 = np.concatenate([data[n][1] for n in sets[:2]])
    out["sets_5_6"] = cr.router.evaluate(h56, y56)["mocae"]
    print(json.dumps({k: ({m: round(v[m], 4) for m in ("accuracy", "ece")} if isinstance(v, dict)
                          else v) for k, v in out.items()}), flush=True)
