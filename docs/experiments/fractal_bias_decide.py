"""Apply the pre-registered rule of ``fractal_bias_protocol.md`` to the CV outputs.

    python docs/experiments/fractal_bias_decide.py s3.cv.json s4.cv.json s5.cv.json
"""

import json
import sys

import numpy as np

METRICS = ("balanced_nll", "ece", "balanced_ece", "accuracy", "balanced_accuracy")


def table(runs: list[dict], off: str, on: str, label: str) -> dict[str, float]:
    """Print each run's mean metrics off -> on and return the mean deltas (on - off)."""
    print(f"{'seed':>4} " + " ".join(f"{m:>26}" for m in METRICS))
    for r in runs:
        print(f"{r['seed']:>4} " + " ".join(
            f"{r['mean'][off][m]:.4f} -> {r['mean'][on][m]:.4f} ({r['mean'][on][m] - r['mean'][off][m]:+.4f})"
            for m in METRICS))
    delta = {m: float(np.mean([r["mean"][on][m] - r["mean"][off][m] for r in runs]))
             for m in METRICS}
    print(f"mean delta ({label}):", {m: round(v, 4) for m, v in delta.items()})
    return delta


def main() -> None:
    runs = [json.load(open(p)) for p in sys.argv[1:]]
    delta = table(runs, "fractal_bias=false", "fractal_bias=true", "on - off")
    checks = {
        "1. balanced NLL lower": delta["balanced_nll"] < 0,
        "2. ECE and balanced ECE lower": delta["ece"] < 0 and delta["balanced_ece"] < 0,
        "3. accuracy and balanced accuracy at most 0.5 points lower":
            delta["accuracy"] >= -0.005 and delta["balanced_accuracy"] >= -0.005,
    }
    for k, v in checks.items():
        print(f"{k}: {'yes' if v else 'NO'}")
    print("decision: fractal_bias", "ON by default" if all(checks.values()) else "stays OFF")


if __name__ == "__main__":
    main()
