"""Every ablation row of saved routers on shipped hand-labelled sets, embedded with each
router's own saved encoder (``seeds_boundary/readout.served_features``): for a set a router's
report lacks, as the twelfth set for the W38 routers of this round, calibrated before it was
an evaluation set. ``--png`` also draws the README's reliability figure for the first router:
raw softmax and MoCaE on its test split (dataset-origin labels; checked against its report)
and on the sets, by the calibration job's own
:func:`alignx.router.calibrate.reliability_png`.

    python docs/experiments/wise_2/rows.py --sets intent_set_12 RUN...
    python docs/experiments/wise_2/rows.py --sets intent_set_12,intent_set_13 --pool --floor RUN...
    ALIGNX_DATA_DIR=../shared/data python docs/experiments/wise_2/rows.py RUN \\
        --sets intent_validation,intent_set,intent_set_9,intent_set_10,intent_set_11,intent_set_12 \\
        --png docs/images/router_reliability_seed0.png
"""
import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np

from alignx.config import load_config
from alignx.router.calibrate import gather_prompts, reliability_png
from alignx.router.metrics import ece, ece_if_calibrated
from alignx.router.targets import read_intent_prompts

D = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("readout", D / "seeds_boundary" / "readout.py")
readout = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readout)


def test_panel(run: str, cr, features) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Raw softmax and MoCaE on the run's own test split (its saved config's data and seed)."""
    texts, y = gather_prompts(load_config(Path(run) / "router" / "config.yaml"), "test")
    probs = cr.router.ablation_probs(features(texts))
    report = json.loads((Path(run) / "router" / "router_report.json").read_text())
    mine, want = ece(probs["mocae"], y, 15), report["test_origin_labels"]["mocae"]["ece"]
    assert abs(mine - want) < 2e-3, (mine, want)
    return {"raw softmax": probs["raw_softmax"], "MoCaE": probs["mocae"]}, y


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="router run directories")
    ap.add_argument("--sets", required=True, help="comma-separated set names, without .jsonl")
    ap.add_argument("--rows", default="raw_softmax,mocae", help="ablation rows to print")
    ap.add_argument("--png", help="draw the first router's reliability figure here")
    ap.add_argument("--floor", action="store_true", help="also the MoCaE row's ECE if it were "
                    "perfectly calibrated (metrics.ece_if_calibrated, as in the report)")
    ap.add_argument("--pool", action="store_true", help="also every row on the sets pooled "
                    "(key: the set names joined by '+')")
    ap.add_argument("--title", default="shipped router (W38), seed 0")
    a = ap.parse_args()
    for i, run in enumerate(a.runs):
        cr, features = readout.served_features(run)
        out = {"run": run}
        panels = {"test split (origin labels)": test_panel(run, cr, features)} \
            if a.png and i == 0 else {}
        seed = load_config(Path(run) / "router" / "config.yaml").seed  # the report's draws
        data = {}
        for name in a.sets.split(","):
            texts, axes = read_intent_prompts(name=f"{name}.jsonl")
            data[name] = (features(texts), np.array([cr.axes.index(ax) for ax in axes]))
        if a.pool:
            parts = list(data.values())
            data["+".join(data)] = (np.concatenate([h for h, _ in parts]),
                                    np.concatenate([y for _, y in parts]))
        for name, (h, y) in data.items():
            rows = cr.router.evaluate(h, y)
            out[name] = {r: {m: round(rows[r][m], 4) for m in ("accuracy", "ece")}
                         for r in a.rows.split(",")}
            p = cr.router.ablation_probs(h) if a.floor or panels else None
            if a.floor:
                floor = ece_if_calibrated(p["mocae"], seed=seed)
                out[name]["mocae_ece_if_calibrated"] = {k: round(v, 4) for k, v in floor.items()}
            if panels:
                panels[name] = ({"raw softmax": p["raw_softmax"], "MoCaE": p["mocae"]}, y)
        print(json.dumps(out), flush=True)
        if panels:
            reliability_png(panels, Path(a.png), a.title)
