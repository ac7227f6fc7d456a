"""Feasibility probe for the next calibration candidate (validation data only; nothing is
chosen or shipped from it): a pooling temperature that grows with the prompt's distance from
the training clouds, T(x) = exp(a + b z(x)), z the standardised nearest-centroid distance.

On the D-half run of seed 0 (``shift_calibration_protocol.md``): the MoCaE calibrators are
refitted on one half of the origin validation split + the third set's calibration half, then
(a, b) by class-balanced NLL on the same rows; held out are the other origin half and the third
set's decision half. Never reads the test split or the fourth set. Needs scipy, which the
sentence encoder's sentence-transformers installs.

    ALIGNX_DATA_DIR=../shared/data python docs/experiments/shift_calibration/distance_temperature_probe.py RUN_DIR DUMP.pkl
"""

import pickle
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from alignx.config import load_config
from alignx.router import metrics as rm
from alignx.router.calibrate import _labelled_files, gather_prompts
from alignx.router.mocae import MoCaERouter, _prior_weights
from alignx.router.serving import load

DECISION_HALF = Path(__file__).resolve().parent / "set3_decision_half.jsonl"


def nll(p: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    return float(-(w * np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1))).sum() / w.sum())


def sharpen(p: np.ndarray, z: np.ndarray, a: float, b: float) -> np.ndarray:
    """softmax(log p / T(x)) with T(x) = exp(a + b z)."""
    lp = np.log(np.clip(p, 1e-12, 1)) / np.exp(a + b * z)[:, None]
    lp -= lp.max(axis=1, keepdims=True)
    q = np.exp(lp)
    return q / q.sum(axis=1, keepdims=True)


def folds_and_held_out(run: Path, dump: str, held_out: Path):
    """The run's axes, its dumped fit, the two origin-validation folds (seeded permutation) and
    the features and labels of a held-out prompt file (encoded by the run's encoder)."""
    cfg = load_config(run / "router" / "config.yaml")
    cr = load(run)
    axes = list(cr.router.axes)
    dec_texts, dec_y = _labelled_files((str(held_out),), (), axes)[0]
    h_dec = cr.build_encoder(cfg.model).encode(dec_texts)
    fit = pickle.load(open(dump, "rb"))["fits"][0]
    n_o = len(gather_prompts(cfg, "validation")[1])  # origin rows first, then calibration rows
    perm = np.random.default_rng(0).permutation(n_o)
    return axes, fit, [perm[: n_o // 2], perm[n_o // 2 :]], h_dec, np.asarray(dec_y)


def main(run: Path, dump: str) -> None:
    axes, fit, folds, h_dec, dec_y = folds_and_held_out(run, dump, DECISION_HALF)
    hv, yv = fit["h_va"], fit["y_va"]
    n_o = len(folds[0]) + len(folds[1])
    for k in (0, 1):
        fit_idx = np.concatenate([folds[k], np.arange(n_o, len(yv))])
        held = folds[1 - k]
        r = MoCaERouter(fit["config"], axes=axes).fit(
            fit["h_tr"], fit["y_tr"], hv[fit_idx], yv[fit_idx], sample_weight=fit["sw"])
        pred = {"fit": r.predict(hv[fit_idx]), "origin_held_out": r.predict(hv[held]),
                "set3_decision_half": r.predict(h_dec)}
        ys = {"fit": yv[fit_idx], "origin_held_out": yv[held],
              "set3_decision_half": np.asarray(dec_y)}
        d = pred["fit"].ood_score
        mu, sd = d.mean(), d.std()
        w = _prior_weights(ys["fit"], len(axes), "balanced")
        p_fit, z_fit, y_fit = pred["fit"].weights, (d - mu) / sd, ys["fit"]
        a, b = minimize(lambda th, p=p_fit, z=z_fit, y=y_fit, w=w: nll(sharpen(p, z, *th), y, w),
                        [0.0, 0.0], method="Nelder-Mead").x
        print(f"fold {k}: a {a:+.3f} b {b:+.3f}; mean distance: origin held out "
              f"{pred['origin_held_out'].ood_score.mean():.3f}, set-3 decision half "
              f"{pred['set3_decision_half'].ood_score.mean():.3f}")
        for name in ("origin_held_out", "set3_decision_half"):
            p0, y = pred[name].weights, ys[name]
            p1 = sharpen(p0, (pred[name].ood_score - mu) / sd, a, b)
            print(f"  {name:<20} accuracy {(p0.argmax(1) == y).mean():.3f}  MoCaE ECE "
                  f"{rm.ece(p0, y, 15):.3f} conf {p0.max(1).mean():.3f}  |  distance T: ECE "
                  f"{rm.ece(p1, y, 15):.3f} conf {p1.max(1).mean():.3f}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2])
