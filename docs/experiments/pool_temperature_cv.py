"""Validation-only cross-validation of ``router.pool_temperature`` (shared vs per_axis).

Same folds, refits and metrics as ``fractal_bias_cv.py`` (whose functions it imports): the
first fit of a ``dump_calibration.py`` dump (the shipped router's training and validation
features; nothing of the test split or the intent set); for each setting, every
validation-fitted part of MoCaE is refitted on 4/5 of the validation prompts and predicts the
fifth (5 folds stratified by target, fold seeds 0, 1, 2).

    python docs/experiments/pool_temperature_cv.py DUMP.pkl seed=6 > DUMP.pt.json

Prints one JSON object: the out-of-fold metrics per setting and fold seed, their means, and
whether the out-of-fold argmax was identical under both settings.
"""

import json
import pickle
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fractal_bias_cv import balanced_metrics, base_config, out_of_fold  # noqa: E402

SETTINGS = {"pool_temperature=shared": False, "pool_temperature=per_axis": True}


def main() -> None:
    dump_path, overrides = sys.argv[1], sys.argv[2:]
    base, seed = base_config(overrides)  # fractal_bias off, as in the config
    with open(dump_path, "rb") as f:
        fit = pickle.load(f)["fits"][0]
    t_va = fit["y_va"]
    out: dict = {"dump": dump_path, "seed": seed, "validation_targets": np.bincount(t_va).tolist(),
                 "per_fold_seed": {}, "mean": {}, "same_argmax": []}
    preds: dict[str, list[np.ndarray]] = {}
    for name, per_axis in SETTINGS.items():
        rows, preds[name] = [], []
        for fold_seed in (0, 1, 2):
            oof = out_of_fold(base, fit, fold_seed, pool_temperature_per_axis=per_axis)
            rows.append(balanced_metrics(oof, t_va))
            preds[name].append(oof.argmax(1))
            print(name, fold_seed, json.dumps(rows[-1]), file=sys.stderr, flush=True)
        out["per_fold_seed"][name] = rows
        out["mean"][name] = {m: float(np.mean([row[m] for row in rows])) for m in rows[0]}
    a, b = preds.values()
    out["same_argmax"] = [bool(np.array_equal(x, y)) for x, y in zip(a, b, strict=True)]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
