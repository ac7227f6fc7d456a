"""Readout of docs/experiments/seeds_boundary_protocol.md: MoCaE accuracy / ECE of saved routers.

    python docs/experiments/seeds_boundary/readout.py ROUTER_RUN_DIR...            # decision data
    python docs/experiments/seeds_boundary/readout.py --set-7 ROUTER_RUN_DIR...    # + the measurement
    python docs/experiments/seeds_boundary/readout.py --decision 5,6,7,8,9 [--measure 10] RUN...

Test split and intent validation come from each router's own report. The decision sets (5 and
6), pooled, and (with --set-7) the seventh set are embedded here with the router's saved encoder
through its served feature function, so W routers and X routers are scored the same way. The
per-set figures recomputed here are checked against the report's (they must agree).
:func:`readout` is shared with ``seeds_boundary_2/readout.py``, :func:`served_features`
with ``seeds_pairs/confident_misses.py``.
"""
import json
from pathlib import Path

import numpy as np

from alignx.config import load_config
from alignx.router.serving import load
from alignx.router.targets import read_intent_prompts


def served_features(run: str):
    """The router saved in ``run`` and a function texts -> its served features h (N, d),
    embedded with the router's own saved encoder (built once)."""
    cr = load(run)
    model_cfg = load_config(Path(run) / "router" / "config.yaml").model
    embed = cr.features(cr.build_encoder(model_cfg))
    return cr, lambda texts: cr.split(embed(texts))[0]


def readout(runs: list[str], decision: tuple[str, ...], measure: tuple[str, ...] = (),
            pooled_key: str = "sets_5_6") -> None:
    """Print one JSON line per run: test, intent validation, every set of ``decision`` and
    ``measure`` (keys without ``.jsonl``) and the decision sets pooled (``pooled_key``)."""
    sets = [*decision, *measure]
    for run in runs:
        cr, features = served_features(run)
        report = json.loads((Path(run) / "router" / "router_report.json").read_text())
        out = {"run": run, "test": report["test_origin_labels"]["mocae"],
               "intent_validation": report["intent_validation"]["mocae"]}
        data = {}
        for name in sets:
            texts, axes = read_intent_prompts(name=name)
            data[name] = (features(texts), np.array([cr.axes.index(a) for a in axes]))
            out[name.removesuffix(".jsonl")] = cr.router.evaluate(*data[name])["mocae"]
        for name in sets:
            key = name.removesuffix(".jsonl")
            if key not in report:  # a router calibrated before the set was an evaluation set
                continue
            mine, theirs = out[key], report[key]["mocae"]
            # routers calibrated before the served feature function embed through
            # sentence-transformers; the two agree to float rounding, so at most a prompt moves
            n = len(data[name][1])
            assert abs(mine["accuracy"] - theirs["accuracy"]) <= 1.5 / n, (key, mine, theirs)
            assert abs(mine["ece"] - theirs["ece"]) < 2e-3, (key, mine["ece"], theirs["ece"])
        h = np.concatenate([data[n][0] for n in decision])
        y = np.concatenate([data[n][1] for n in decision])
        out[pooled_key] = cr.router.evaluate(h, y)["mocae"]
        print(json.dumps({k: ({m: round(v[m], 4) for m in ("accuracy", "ece")}
                              if isinstance(v, dict) else v) for k, v in out.items()}),
              flush=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="router run directories")
    ap.add_argument("--set-7", action="store_true", help="this protocol's measurement")
    ap.add_argument("--decision", default="5,6", help="decision sets, pooled (default 5,6; "
                    "seeds_pairs_protocol.md: 5,6,7,8,9)")
    ap.add_argument("--measure", default="", help="measurement sets (seeds_pairs: 10)")
    a = ap.parse_args()
    sets = [int(k) for k in a.decision.split(",")]
    measure = [int(k) for k in a.measure.split(",") if k] + ([7] if a.set_7 else [])
    readout(a.runs, tuple(f"intent_set_{k}.jsonl" for k in sets),
            tuple(f"intent_set_{k}.jsonl" for k in measure),
            "sets_" + "_".join(map(str, sets)))
