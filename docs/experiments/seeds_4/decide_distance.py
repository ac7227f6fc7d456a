"""Rule R2 of ``seeds_4_protocol.md``: does the distance-aware pooling temperature lower ECE on
held-out prompts? Validation data and the fourth set's decision half only.

On the dumped features of the decision run (E-half, seed 0), the origin validation split is cut
in two (seeded permutation, as ``shift_calibration/distance_temperature_probe.py``). For each
half k, MoCaE is fitted on origin half k + every calibration prompt; every T_pool form is
always fitted, so one fit gives both arms: ``mocae`` (shared T_pool) and
``mocae_distance_pool_t``. Both are scored on the other origin half and on the decision half.
Adopted if the mean held-out origin ECE is at least 0.005 lower with the distance form and the
mean decision-half ECE at most 0.005 higher.

    ALIGNX_DATA_DIR=../shared/data python docs/experiments/seeds_4/decide_distance.py RUN_DIR DUMP.pkl
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np

from alignx.router import metrics as rm
from alignx.router.mocae import MoCaERouter

D = Path(__file__).resolve().parent
DECISION_HALF = D / "set4_decision_half.jsonl"
spec = importlib.util.spec_from_file_location(
    "probe", D.parent / "shift_calibration" / "distance_temperature_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)
ARMS = {"shared": "mocae", "distance": "mocae_distance_pool_t"}


def main(run: Path, dump: str) -> None:
    axes, fit, folds, h_dec, dec_y = probe.folds_and_held_out(run, dump, DECISION_HALF)
    if fit["config"].pool_temperature_per_axis:
        sys.exit("the decision run must use the shared T_pool")
    hv, yv = fit["h_va"], fit["y_va"]
    n_o = len(folds[0]) + len(folds[1])  # origin rows first, then calibration rows
    ece = {(arm, s): [] for arm in ARMS for s in ("origin_held_out", "decision_half")}
    for k in (0, 1):
        fit_idx = np.concatenate([folds[k], np.arange(n_o, len(yv))])
        r = MoCaERouter(fit["config"], axes=axes).fit(
            fit["h_tr"], fit["y_tr"], hv[fit_idx], yv[fit_idx], sample_weight=fit["sw"])
        print(f"fold {k}: (a, b) = ({r.distance_ab[0]:+.3f}, {r.distance_ab[1]:+.3f}), shared "
              f"T_pool {r.pool_t:.3f}, mode {r.fractal_mode}")
        for s, (h, y) in {"origin_held_out": (hv[folds[1 - k]], yv[folds[1 - k]]),
                          "decision_half": (h_dec, dec_y)}.items():
            probs = r.ablation_probs(h)
            line = [f"  {s:<16} accuracy {(probs['mocae'].argmax(1) == y).mean():.3f}"]
            for arm, row in ARMS.items():
                e = rm.ece(probs[row], y, 15)
                ece[arm, s].append(e)
                line.append(f"{arm}: ECE {e:.3f} conf {probs[row].max(1).mean():.3f}")
            print("  |  ".join(line))
    mean = {key: float(np.mean(v)) for key, v in ece.items()}
    d_origin = mean["distance", "origin_held_out"] - mean["shared", "origin_held_out"]
    d_dec = mean["distance", "decision_half"] - mean["shared", "decision_half"]
    ok = d_origin <= -0.005 and d_dec <= 0.005
    print(f"\nmean ECE, distance - shared: held-out origin {d_origin:+.4f} (needs <= -0.005), "
          f"decision half {d_dec:+.4f} (needs <= +0.005)")
    print("R2: the distance-aware T_pool is " + ("ADOPTED" if ok else "NOT adopted"))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2])
