"""Score saved routers on the second frozen intent set (``intent_set_2_protocol.md``).

For each run directory: load its router and (fine-tuned) encoder as serving does, embed both
frozen intent sets, and check first that the saved router reproduces the report's own
``intent_set`` row (the first set, scored by the job). Then print one JSON line: every
ablation row on the second set and on both sets pooled, MoCaE's ECE minus raw softmax's with
its paired-bootstrap interval, and the ECE a perfectly calibrated router would show there.
No router is refitted and nothing is chosen.

    python docs/experiments/intent_set_2_readout.py RUN_DIR [RUN_DIR ...] > readout.jsonl
"""

import json
import sys
from pathlib import Path

import numpy as np

from alignx.config import load_config
from alignx.router import metrics as rmetrics
from alignx.router.calibrate import _shipped_set
from alignx.router.serving import load

ROWS = ("raw_softmax", "temperature", "fractal", "natural", "mocae_fitted", "mocae")


def readout(run_dir: Path) -> dict:
    cfg = load_config(run_dir / "router" / "config.yaml")
    cr = load(run_dir)
    axes = [a for a in cr.router.axes]
    encoder = cr.build_encoder(cfg.model)
    report = json.loads((run_dir / "router" / "router_report.json").read_text())
    sets = {key: _shipped_set(f"{key}.jsonl", axes) for key in ("intent_set", "intent_set_2")}
    feats = {key: encoder.encode(texts) for key, (texts, _) in sets.items()}
    job, mine = report["intent_set"]["mocae"], cr.router.evaluate(
        feats["intent_set"], sets["intent_set"][1])["mocae"]
    # the job embedded in Ray Data batches; float noise may move an ECE in its last digits
    if mine["accuracy"] != job["accuracy"] or abs(mine["ece"] - job["ece"]) > 1e-4:
        sys.exit(f"{run_dir}: the saved router does not reproduce its report's intent_set row "
                 f"({mine} vs {job})")
    pooled = (np.concatenate([feats["intent_set"], feats["intent_set_2"]]),
              np.concatenate([sets["intent_set"][1], sets["intent_set_2"][1]]))
    out = {"run_dir": str(run_dir), "seed": cfg.seed}
    for key, (h, y) in (("intent_set_2", (feats["intent_set_2"], sets["intent_set_2"][1])),
                        ("intent_sets_pooled", pooled)):
        rows = cr.router.evaluate(h, y)
        probs = cr.router.ablation_probs(h)
        out[key] = {
            "n": len(y),
            "rows": {r: {m: rows[r][m] for m in ("accuracy", "ece", "nll")} for r in ROWS},
            "confidence_mocae": float(probs["mocae"].max(axis=1).mean()),
            "ece_mocae_minus_raw_softmax": rmetrics.ece_gap_bootstrap(
                probs["mocae"], probs["raw_softmax"], y, seed=cfg.seed),
            "ece_if_calibrated": {r: rmetrics.ece_if_calibrated(probs[r], seed=cfg.seed)
                                  for r in ("mocae", "raw_softmax")},
        }
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for arg in sys.argv[1:]:
        print(json.dumps(readout(Path(arg))), flush=True)
