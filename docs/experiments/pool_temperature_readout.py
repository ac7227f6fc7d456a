"""Test and intent-set readout of both ``router.pool_temperature`` settings from a dump.

Run once per seed, after the decision of ``pool_temperature_protocol.md``. Refits the shipped
router from the dump's first fit (every router fits both settings; the shipped config routes
with the shared one) and scores it on the evaluation features the driver dumped (test split
on origin labels, then the intent set; the shipped router's are the third and sixth
evaluation). Checks first that the refit reproduces the job's own ``mocae`` row of
``router_report.json``.

    python docs/experiments/pool_temperature_readout.py DUMP.pkl RUN_DIR seed=6
"""

import json
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fractal_bias_cv import base_config  # noqa: E402

from alignx.router.mocae import MoCaERouter  # noqa: E402

dump_path, run_dir, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
base, seed = base_config(overrides)
with open(dump_path, "rb") as f:
    dump = pickle.load(f)
fit = dump["fits"][0]
router = MoCaERouter(base).fit(fit["h_tr"], fit["y_tr"], fit["h_va"], fit["y_va"],
                               sample_weight=fit["sw"])
report = json.loads((run_dir / "router" / "router_report.json").read_text())
out = {"seed": seed}
for key, ev in (("test_origin_labels", dump["evals"][2]), ("intent_set", dump["evals"][5])):
    rows = router.evaluate(ev["h"], ev["y"])
    job = report[key]["mocae"]
    mine = rows["mocae"]
    if abs(mine["ece"] - job["ece"]) > 1e-9 or mine["accuracy"] != job["accuracy"]:
        sys.exit(f"{key}: the refit does not reproduce the job's mocae row ({mine} vs {job})")
    out[key] = {s: {m: rows[row][m] for m in ("accuracy", "ece", "nll")}
                for s, row in (("shared", "mocae"), ("per_axis", "mocae_per_axis_pool_t"))}
    out[key]["raw_softmax"] = {m: rows["raw_softmax"][m] for m in ("accuracy", "ece", "nll")}
out["pool_t"] = {"shared": router.pool_temperature[f"{base.lambda_mode}_{router.fractal_mode}"],
                 "per_axis": router.pool_temperature[
                     f"{base.lambda_mode}_{router.fractal_mode}_per_axis"].tolist()}
print(json.dumps(out))
