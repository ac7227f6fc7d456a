"""Score saved routers for the shift-calibration experiment (``shift_calibration_protocol.md``).

For each run directory, the readout of ``intent_seeds_2/readout.py`` (which checks that the
saved router reproduces its report, then scores the validation split on origin labels and
every evaluation set of this commit), plus the same scores on hand-labelled files named here:

- ``set3_decision_half`` / ``set3_calibration_half``: the third set's two halves by theme (the
  decision reads the first; D-half calibrated on the second, so it is in-sample there),
- ``intent_set_3`` and ``intent_set_2`` whole (no longer evaluation sets: for the record).

With ``--refit-without-calibration DUMP.pkl`` (the run's ``dump_calibration.py`` output) a
second line scores the same router refitted on the same features with the calibration
prompts left out of its validation data (an ablation: the seeds' share of the change).
No other router is refitted.

    python docs/experiments/shift_calibration/readout.py RUN_DIR [--refit-without-calibration P] > r.jsonl
"""

import argparse
import importlib.util
import json
import pickle
from pathlib import Path

from alignx.config import load_config
from alignx.router.calibrate import _labelled_files, _shipped_set, gather_prompts
from alignx.router.mocae import MoCaERouter
from alignx.router.serving import load

D = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("seeds2_readout", D.parent / "intent_seeds_2" / "readout.py")
base = importlib.util.module_from_spec(spec)
spec.loader.exec_module(base)

EXTRA = {"set3_decision_half": D / "set3_decision_half.jsonl",
         "set3_calibration_half": D / "set3_calibration_half.jsonl",
         "intent_set_3": "intent_set_3.jsonl", "intent_set_2": "intent_set_2.jsonl"}


def extra_sets(axes) -> dict:
    out = {}
    for key, f in EXTRA.items():
        out[key] = (_labelled_files((str(f),), (), axes)[0] if isinstance(f, Path)
                    else _shipped_set(f, axes))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--refit-without-calibration", type=Path, metavar="DUMP_PKL")
    a = ap.parse_args()
    for run_dir in a.run_dirs:
        out = base.readout(run_dir)
        cfg = load_config(run_dir / "router" / "config.yaml")
        # from the report: an older run's config.yaml lacks the key, and loading it fills
        # in today's default
        report = json.loads((run_dir / "router" / "router_report.json").read_text())
        out["calibration_sets"] = report.get("calibration_sets", [])
        cr = load(run_dir)
        axes = list(cr.router.axes)
        encoder = cr.build_encoder(cfg.model)
        sets = extra_sets(axes)
        feats = {k: encoder.encode(t) for k, (t, _) in sets.items()}
        for key, (_, y) in sets.items():
            out[key] = base.scored(cr.router, feats[key], y, cfg.seed)
        print(json.dumps(out), flush=True)
        if a.refit_without_calibration:
            fit = pickle.load(open(a.refit_without_calibration, "rb"))["fits"][0]
            va_texts, va_y = gather_prompts(cfg, "validation")
            n_va = len(va_y)  # the fit's validation rows: these first, then the calibration ones
            r = MoCaERouter(fit["config"], axes=axes).fit(
                fit["h_tr"], fit["y_tr"], fit["h_va"][:n_va], fit["y_va"][:n_va],
                sample_weight=fit["sw"])
            abl = {"run_dir": str(run_dir), "seed": cfg.seed, "seed_sets": out["seed_sets"],
                   "calibration_sets": [], "ablation": "refit without calibration prompts",
                   "validation_origin": base.scored(r, encoder.encode(va_texts), va_y, cfg.seed)}
            ev = {k: base._shipped_set(f, axes) for k, (f, _) in base.EVALUATION_SETS.items()}
            for key, (t, y) in ev.items():
                abl[key] = base.scored(r, encoder.encode(t), y, cfg.seed)
            for key, (_, y) in sets.items():
                abl[key] = base.scored(r, feats[key], y, cfg.seed)
            print(json.dumps(abl), flush=True)


if __name__ == "__main__":
    main()
