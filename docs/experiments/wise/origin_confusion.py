"""Where saved routers err on the dataset-origin test split (reporting only; nothing is chosen
on it): per origin, how many prompts MoCaE sends to each expert.

    ALIGNX_DATA_DIR=../shared/data python docs/experiments/wise/origin_confusion.py RUN...

The test prompts are read as the calibration job reads them (the run's saved router config)
and embedded through the router's served feature function.
"""
import importlib.util
import json
import sys
from pathlib import Path

from alignx.config import load_config
from alignx.router.calibrate import gather_prompts

spec = importlib.util.spec_from_file_location(
    "boundary_readout", Path(__file__).resolve().parent.parent / "seeds_boundary" / "readout.py")
boundary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(boundary)

for run in sys.argv[1:]:
    cfg = load_config(Path(run) / "router" / "config.yaml")
    texts, y = gather_prompts(cfg, "test")
    cr, features = boundary.served_features(run)
    pred = cr.router.predict(features(texts)).weights.argmax(1)
    axes = [a.value for a in cr.axes]
    print(json.dumps({"run": run, "n": len(y), "correct": int((pred == y).sum()),
                      "origin_to_expert": {axes[o]: {axes[p]: int(((y == o) & (pred == p)).sum())
                                                      for p in range(len(axes))}
                                           for o in range(len(axes))}}), flush=True)
