"""Apply the pre-registered rule of ``pool_temperature_protocol.md`` to the CV outputs.

    python docs/experiments/pool_temperature_decide.py s3.pt.json s4.pt.json ... s8.pt.json
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fractal_bias_decide import table  # noqa: E402

off, on = "pool_temperature=shared", "pool_temperature=per_axis"
runs = [json.load(open(p)) for p in sys.argv[1:]]
delta = table(runs, off, on, "per_axis - shared")
lower_ece = sum(r["mean"][on]["ece"] < r["mean"][off]["ece"] for r in runs)
checks = {
    "1. balanced NLL lower": delta["balanced_nll"] < 0,
    "2. ECE and balanced ECE lower": delta["ece"] < 0 and delta["balanced_ece"] < 0,
    f"3. ECE lower on at least {len(runs) - 2} of {len(runs)} seeds ({lower_ece})":
        lower_ece >= len(runs) - 2,
    "4. routing unchanged (same out-of-fold argmax)": all(all(r["same_argmax"]) for r in runs),
}
for k, v in checks.items():
    print(f"{k}: {'yes' if v else 'NO'}")
print("decision: pool_temperature", "per_axis by default" if all(checks.values())
      else "stays shared")
