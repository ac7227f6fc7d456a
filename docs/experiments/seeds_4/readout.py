"""Score routers for the experiment of ``seeds_4_protocol.md``; one JSON line per router.

The router of RUN_DIR as saved, or (``--dump``) refitted with this commit's code on the features
its calibration job dumped (``dump_calibration.py``), with the pooling temperature form of
``--pool-temperature``; a refit must reproduce the saved router's shared-T_pool confidences, or
the script stops. Scored (``intent_seeds_2/readout.py``'s ``scored``: every ablation row, mean
confidence, ECE gap to raw softmax, the sampling floor):

- ``validation_origin`` / ``test_origin``: the validation and test splits, dataset-origin labels,
- ``intent_validation``, ``intent_set`` (intent set 1),
- ``set4_decision_half`` (the decision reads it) and ``set4_seed_half`` (E-half trains on it),
- ``intent_set_5`` only with ``--set-5`` (the measurement; after the decision).

    python docs/experiments/seeds_4/readout.py RUN_DIR [--dump P --pool-temperature distance] > r.jsonl
"""

import argparse
import dataclasses
import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np

from alignx.config import load_config
from alignx.router.calibrate import _labelled_files, _shipped_set, gather_prompts
from alignx.router.mocae import MoCaERouter
from alignx.router.serving import load

D = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("seeds2_readout", D.parent / "intent_seeds_2" / "readout.py")
base = importlib.util.module_from_spec(spec)
spec.loader.exec_module(base)

HALVES = {"set4_decision_half": D / "set4_decision_half.jsonl",
          "set4_seed_half": D / "set4_seed_half.jsonl"}
SHIPPED = {"intent_validation": "intent_validation.jsonl", "intent_set": "intent_set.jsonl"}


def refit(cr, dump: Path, form: str) -> MoCaERouter:
    fit = pickle.load(open(dump, "rb"))["fits"][0]
    config = dataclasses.replace(fit["config"], pool_temperature_distance=form == "distance",
                                 pool_temperature_per_axis=form == "per_axis")
    r = MoCaERouter(config, axes=list(cr.router.axes)).fit(
        fit["h_tr"], fit["y_tr"], fit["h_va"], fit["y_va"], sample_weight=fit["sw"])
    want = cr.router.ablation_probs(fit["h_va"])["mocae"]
    got = r.ablation_probs(fit["h_va"])
    got = got["mocae"] if form == "shared" else got["mocae_shared_pool_t"]
    if not np.allclose(got, want, atol=1e-6):
        raise SystemExit(f"{dump}: the refit does not reproduce the saved router")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--dump", type=Path, help="refit on this dump_calibration.py output")
    ap.add_argument("--pool-temperature", choices=("shared", "per_axis", "distance"),
                    default="shared", help="T_pool form of the refit (with --dump)")
    ap.add_argument("--set-5", action="store_true", help="also score intent_set_5.jsonl")
    a = ap.parse_args()
    cfg = load_config(a.run_dir / "router" / "config.yaml")
    cr = load(a.run_dir)
    axes = list(cr.router.axes)
    router = refit(cr, a.dump, a.pool_temperature) if a.dump else cr.router
    report = json.loads((a.run_dir / "router" / "router_report.json").read_text())
    sets = {"validation_origin": gather_prompts(cfg, "validation"),
            "test_origin": gather_prompts(cfg, "test"),
            **{k: _shipped_set(f, axes) for k, f in SHIPPED.items()},
            **{k: _labelled_files((str(f),), (), axes)[0] for k, f in HALVES.items()}}
    if a.set_5:
        sets["intent_set_5"] = _shipped_set("intent_set_5.jsonl", axes)
    encoder = cr.build_encoder(cfg.model)
    out = {"run_dir": str(a.run_dir), "seed": cfg.seed, "seed_sets": report.get("seed_sets"),
           "calibration_sets": report.get("calibration_sets", []),
           "router": "refit" if a.dump else "saved", "pool_temperature": router.pool_form,
           "distance_ab": router.distance_ab if router.distance_temperature else None}
    for key, (texts, y) in sets.items():
        h = encoder.encode(texts)
        out[key] = base.scored(router, h, np.asarray(y), cfg.seed)
        out[key]["mean_ood_score"] = float(router.predict(h).ood_score.mean())
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
