"""Score saved routers for the seed-set-2 experiment (``intent_seeds_2_protocol.md``).

For each run directory: load its router and (fine-tuned) encoder as serving does, check that it
reproduces its report's own ``intent_set`` row, then print one JSON line with

- ``validation_origin``: MoCaE on the validation split against dataset-origin labels (rule 2),
- every hand-labelled evaluation set (``EVALUATION_SETS``: intent validation, rule 1; intent
  sets 1-3): every ablation row, MoCaE's mean confidence, its ECE minus raw softmax's with a
  paired-bootstrap interval, and the ECE a perfectly calibrated router would show there,
- the report's own test-split rows (dataset-origin labels).

No router is refitted. Routers calibrated before a set existed are scored on it here exactly as
the calibration job of this commit scores it.

    python docs/experiments/intent_seeds_2/readout.py RUN_DIR [RUN_DIR ...] > readout.jsonl
"""

import json
import sys
from pathlib import Path

import numpy as np

from alignx.config import load_config
from alignx.router import metrics as rmetrics
from alignx.router.calibrate import _shipped_set, gather_prompts
from alignx.router.serving import load
from alignx.router.targets import EVALUATION_SETS

ROWS = ("raw_softmax", "temperature", "fractal", "natural", "mocae_fitted", "mocae")
METRICS = ("accuracy", "macro_f1", "ece", "nll", "brier")


def scored(router, h: np.ndarray, y: np.ndarray, seed: int) -> dict:
    rows = router.evaluate(h, y)
    probs = router.ablation_probs(h)
    return {
        "n": len(y),
        "rows": {r: {m: rows[r][m] for m in METRICS} for r in ROWS},
        "confidence_mocae": float(probs["mocae"].max(axis=1).mean()),
        "ece_mocae_minus_raw_softmax": rmetrics.ece_gap_bootstrap(
            probs["mocae"], probs["raw_softmax"], y, seed=seed),
        "ece_if_calibrated": {r: rmetrics.ece_if_calibrated(probs[r], seed=seed)
                              for r in ("mocae", "raw_softmax")},
    }


def readout(run_dir: Path) -> dict:
    cfg = load_config(run_dir / "router" / "config.yaml")
    cr = load(run_dir)
    axes = list(cr.router.axes)
    encoder = cr.build_encoder(cfg.model)
    report = json.loads((run_dir / "router" / "router_report.json").read_text())
    sets = {key: _shipped_set(fname, axes) for key, (fname, _) in EVALUATION_SETS.items()}
    feats = {key: encoder.encode(texts) for key, (texts, _) in sets.items()}
    job = report["intent_set"]["mocae"]
    mine = cr.router.evaluate(feats["intent_set"], sets["intent_set"][1])["mocae"]
    # the job embedded in Ray Data batches; float noise may move an ECE in its last digits
    if mine["accuracy"] != job["accuracy"] or abs(mine["ece"] - job["ece"]) > 1e-4:
        sys.exit(f"{run_dir}: the saved router does not reproduce its report's intent_set row "
                 f"({mine} vs {job})")
    va_texts, va_origin = gather_prompts(cfg, "validation")
    h_va = encoder.encode(va_texts)
    out = {"run_dir": str(run_dir), "seed": cfg.seed,
           "seed_sets": report.get("seed_sets", ["intent_seeds.jsonl"]),
           "finetune_seed_repeats": (report.get("encoder_finetune") or {}).get("seed_repeats"),
           "validation_origin": scored(cr.router, h_va, va_origin, cfg.seed),
           "test_origin_labels": {r: {m: report["test_origin_labels"][r][m] for m in METRICS}
                                  for r in (*ROWS, "logistic_origin_baseline")}}
    for key, (_, y) in sets.items():
        out[key] = scored(cr.router, feats[key], y, cfg.seed)
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for arg in sys.argv[1:]:
        print(json.dumps(readout(Path(arg))), flush=True)
