"""The fourth set's readout (``shift_calibration_protocol.md``, "What is reported, once"):
per run, MoCaE accuracy / ECE (raw softmax ECE) on every set, then for the fourth set every
ablation row, the ECE gap to raw softmax with its paired-bootstrap interval, the sampling floor
and the mean confidence. Reporting only; nothing is chosen on it.

    python docs/experiments/shift_calibration/summary.py READOUT.jsonl [...]
"""

import json
import sys

KEYS = ("test_origin_labels", "validation_origin", "intent_validation", "intent_set",
        "intent_set_4", "intent_set_3", "intent_set_2")
ROWS = ("raw_softmax", "temperature", "fractal", "natural", "mocae_fitted", "mocae")


def label(r: dict) -> str:
    if r.get("ablation"):
        return "D, refit without calibration prompts"
    return "D" if r["calibration_sets"] else "C"


def cell(r: dict, key: str, row: str = "mocae") -> str:
    block = r[key]["rows"] if "rows" in r[key] else r[key]
    if row not in block:
        return "-"
    return f"{block[row]['accuracy']:.3f} / {block[row]['ece']:.3f}"


def main(paths: list[str]) -> None:
    runs = [json.loads(line) for p in paths for line in open(p, encoding="utf-8") if line.strip()]
    runs.sort(key=lambda r: (r["seed"], label(r)))
    print("MoCaE accuracy / ECE (raw softmax's)")
    print(f"{'run':<40}{'seed':>5}  " + "  ".join(f"{k:>24}" for k in KEYS))
    for r in runs:
        cells = [f"{cell(r, k)} ({cell(r, k, 'raw_softmax').split(' / ')[1]})" if k in r else "-"
                 for k in KEYS]
        print(f"{label(r):<40}{r['seed']:>5}  " + "  ".join(f"{c:>24}" for c in cells))
    print("\nintent_set_4: every row (accuracy / ECE)")
    print(f"{'run':<40}{'seed':>5}  " + "  ".join(f"{k:>14}" for k in ROWS))
    for r in runs:
        print(f"{label(r):<40}{r['seed']:>5}  "
              + "  ".join(f"{cell(r, 'intent_set_4', k):>14}" for k in ROWS))
    print("\nintent_set_4: ECE gap MoCaE - raw softmax [95% CI], floor mean / p95, confidence")
    for r in runs:
        s = r["intent_set_4"]
        g, f = s["ece_mocae_minus_raw_softmax"], s["ece_if_calibrated"]["mocae"]
        print(f"{label(r):<40}{r['seed']:>5}  {g['diff']:+.3f} [{g['ci95_low']:+.3f}, "
              f"{g['ci95_high']:+.3f}]  floor {f['mean']:.3f} / {f['p95']:.3f}  "
              f"confidence {s['confidence_mocae']:.3f}  macro-F1 "
              f"{s['rows']['mocae']['macro_f1']:.3f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
