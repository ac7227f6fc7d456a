"""Tabulate ``readout.py --set-5`` lines (``seeds_4_protocol.md``): per router, MoCaE accuracy /
ECE (raw softmax ECE) and mean confidence on the test split, intent set 1, the fifth set and
intent validation; then every ablation row of the first line, and the ECE gap with its
paired-bootstrap interval and sampling floor on the fifth set.

    python docs/experiments/seeds_4/summary.py readout.jsonl [...]
"""

import json
import sys

KEYS = ("test_origin", "intent_set", "intent_set_5", "intent_validation", "validation_origin")


def cell(r: dict, key: str, row: str = "mocae") -> str:
    m = r[key]["rows"][row]
    return f"{m['accuracy']:.3f} / {m['ece']:.3f}"


def main(paths: list[str]) -> None:
    runs = [json.loads(line) for p in paths for line in open(p, encoding="utf-8") if line.strip()]
    print("| seed | seeds | T_pool | " + " | ".join(KEYS) + " | set-5 confidence |")
    print("|---" * (len(KEYS) + 4) + "|")
    for r in runs:
        half = any("set4_seed_half" in s for s in r["seed_sets"])
        cells = [f"{cell(r, k)} ({r[k]['rows']['raw_softmax']['ece']:.3f})" for k in KEYS]
        print(f"| {r['seed']} | {'E-half' if half else 'D'} | {r['pool_temperature']} | "
              + " | ".join(cells) + f" | {r['intent_set_5']['confidence_mocae']:.3f} |")
    for r in runs:
        g, f = r["intent_set_5"]["ece_mocae_minus_raw_softmax"], r["intent_set_5"]["ece_if_calibrated"]
        print(f"seed {r['seed']} {r['pool_temperature']:<8} set 5: ECE MoCaE - raw "
              f"{g['diff']:+.3f} [{g['ci95_low']:+.3f}, {g['ci95_high']:+.3f}], floor "
              f"{f['mocae']['mean']:.3f} (p95 {f['mocae']['p95']:.3f}), mean OOD score "
              f"{r['intent_set_5']['mean_ood_score']:.3f} vs test {r['test_origin']['mean_ood_score']:.3f}")
    r = runs[0]
    print(f"\nablation rows, seed {r['seed']} ({r['pool_temperature']}):")
    for row in r["test_origin"]["rows"]:
        print(f"  {row:<14} " + "  ".join(f"{k} {cell(r, k, row)}" for k in KEYS[:4]))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
