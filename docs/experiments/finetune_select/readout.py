"""Score the arms of ``finetune_select_protocol.md``; one JSON line per arm.

For each arm directory ``ROOT/{B,S,W}`` written by ``run_arms.py``: load its router and
fine-tuned encoder as serving does, check that they reproduce the report's own intent-set-1 row,
and score (``intent_seeds_2/readout.py``'s ``scored``: every ablation row, mean confidence, ECE
gap to raw softmax, the sampling floor):

- ``validation_origin`` / ``test_origin``: the validation and test splits, dataset-origin labels;
- ``intent_validation``, ``intent_set`` (intent set 1), ``intent_set_4`` (the decision set),
  ``intent_set_5``;
- ``intent_set_6`` only with ``--set-6`` (the measurement: after the decision).

    python docs/experiments/finetune_select/readout.py ROOT [--set-6] > ROOT/readout.jsonl
"""

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np

from alignx.config import load_config
from alignx.router.calibrate import _shipped_set, gather_prompts
from alignx.router.serving import load

D = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("seeds2_readout", D.parent / "intent_seeds_2" / "readout.py")
base = importlib.util.module_from_spec(spec)
spec.loader.exec_module(base)

SHIPPED = {"intent_validation": "intent_validation.jsonl", "intent_set": "intent_set.jsonl",
           "intent_set_4": "intent_set_4.jsonl", "intent_set_5": "intent_set_5.jsonl"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--set-6", action="store_true", help="also score intent_set_6.jsonl")
    a = ap.parse_args()
    for arm in ("B", "S", "W"):
        run_dir = a.root / arm
        cfg = load_config(run_dir / "router" / "config.yaml")
        cr = load(run_dir)
        axes = list(cr.router.axes)
        report = json.loads((run_dir / "router" / "router_report.json").read_text())
        sets = {"validation_origin": gather_prompts(cfg, "validation"),
                "test_origin": gather_prompts(cfg, "test"),
                **{k: _shipped_set(f, axes) for k, f in SHIPPED.items()}}
        if a.set_6:
            sets["intent_set_6"] = _shipped_set("intent_set_6.jsonl", axes)
        encoder = cr.build_encoder(cfg.model)
        ft = report["encoder_finetune"]
        out = {"arm": arm, "run_dir": str(run_dir), "seed": cfg.seed,
               "evals_per_epoch": cfg.router.finetune_evals_per_epoch,
               "select": cfg.router.finetune_select,
               "average_from": cfg.router.finetune_average_from,
               "best_step": ft["best_step"], "averaged_steps": ft["averaged_steps"]}
        for key, (texts, y) in sets.items():
            h = encoder.encode(texts)
            out[key] = base.scored(cr.router, h, np.asarray(y), cfg.seed)
        job, mine = report["intent_set"]["mocae"], out["intent_set"]["rows"]["mocae"]
        if mine["accuracy"] != job["accuracy"] or abs(mine["ece"] - job["ece"]) > 1e-4:
            raise SystemExit(f"{run_dir}: the saved router does not reproduce its report")
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
