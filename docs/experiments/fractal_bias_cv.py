"""Validation-only cross-validation of ``router.fractal_bias`` on a run's dumped features.

Reads the first fit of a ``dump_calibration.py`` dump (the shipped router's training and
validation features and targets; nothing of the test split or the intent set), and, for each
setting of ``fractal_bias``, refits every validation-fitted part of MoCaE on 4/5 of the
validation prompts and predicts the fifth (5 folds stratified by target, fold seeds 0, 1, 2).
The head, projection and epsilon-nets are trained on the training features as in the job.

    python docs/experiments/fractal_bias_cv.py DUMP.pkl seed=3 > DUMP.cv.json

Prints one JSON object: the out-of-fold metrics per setting and fold seed, and their means.
"""

import dataclasses
import json
import pickle
import sys

import numpy as np

from alignx.config import load_config
from alignx.router import metrics as M
from alignx.router.calibrate import mocae_config
from alignx.router.mocae import MoCaEConfig, MoCaERouter


def class_weights(y: np.ndarray, n: int) -> np.ndarray:
    """Row weights giving every class the same total weight (the objectives' balanced prior)."""
    return 1.0 / (n * np.bincount(y, minlength=n)[y])


def balanced_metrics(p: np.ndarray, y: np.ndarray, n_bins: int = 15) -> dict[str, float]:
    n = p.shape[1]
    w = class_weights(y, n)
    conf, pred = p.max(1), p.argmax(1)
    correct = (pred == y).astype(float)
    b = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = sum(w[b == i].sum() / w.sum() * abs(np.average(conf[b == i], weights=w[b == i])
                                             - np.average(correct[b == i], weights=w[b == i]))
              for i in range(n_bins) if (b == i).any())
    return {
        "balanced_nll": float(-(w * np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1))).sum()
                              / w.sum()),
        "balanced_ece": float(ece),
        "balanced_accuracy": float(np.mean([correct[y == a].mean() for a in range(n)])),
        "nll": M.nll(p, y), "ece": M.ece(p, y, n_bins), "accuracy": M.accuracy(p, y),
    }


def folds_of(t_va: np.ndarray, n: int, fold_seed: int) -> np.ndarray:
    """Fold index (0..4) per validation prompt, stratified by target."""
    rng = np.random.default_rng(fold_seed)
    folds = np.zeros(len(t_va), int)
    for a in range(n):
        idx = rng.permutation(np.flatnonzero(t_va == a))
        folds[idx] = np.arange(len(idx)) % 5
    return folds


def out_of_fold(base: MoCaEConfig, fit: dict, fold_seed: int, **setting) -> np.ndarray:
    """Out-of-fold MoCaE weights (M, A) on the validation prompts for one setting."""
    h_tr, t_tr, h_va, t_va, sw = fit["h_tr"], fit["y_tr"], fit["h_va"], fit["y_va"], fit["sw"]
    n = int(t_va.max()) + 1
    folds = folds_of(t_va, n, fold_seed)
    oof = np.zeros((len(t_va), n))
    for k in range(5):
        router = MoCaERouter(dataclasses.replace(base, **setting)).fit(
            h_tr, t_tr, h_va[folds != k], t_va[folds != k], sample_weight=sw)
        oof[folds == k] = router.predict(h_va[folds == k]).weights
    return oof


def base_config(overrides: list[str]) -> tuple[MoCaEConfig, int]:
    """MoCaEConfig of the smollm2_cpu router with ``overrides``, and the seed."""
    cfg = load_config("jobs/configs/smollm2_cpu.yaml", overrides, run_dir="/tmp/alignx-cv")
    return mocae_config(cfg), cfg.seed  # what the calibration job fits


def main() -> None:
    dump_path, overrides = sys.argv[1], sys.argv[2:]
    base, seed = base_config(overrides)
    with open(dump_path, "rb") as f:
        fit = pickle.load(f)["fits"][0]
    t_va = fit["y_va"]
    out: dict = {"dump": dump_path, "seed": seed, "validation_targets": np.bincount(t_va).tolist(),
                 "per_fold_seed": {}, "mean": {}}
    for bias in (False, True):
        name = f"fractal_bias={str(bias).lower()}"
        rows = []
        for fold_seed in (0, 1, 2):
            rows.append(balanced_metrics(out_of_fold(base, fit, fold_seed, fractal_bias=bias),
                                         t_va))
            print(name, fold_seed, json.dumps(rows[-1]), file=sys.stderr, flush=True)
        out["per_fold_seed"][name] = rows
        out["mean"][name] = {m: float(np.mean([row[m] for row in rows])) for m in rows[0]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
