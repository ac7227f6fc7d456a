"""The measurement of ``finetune_select_protocol.md``: every arm on every set, per seed, from
``readout.py --set-6`` lines, as a Markdown table; then W - B per set, per seed and averaged.

    python docs/experiments/finetune_select/summary.py fs0.set6.jsonl fs1.set6.jsonl fs2.set6.jsonl
"""

import json
import sys

import numpy as np

SETS = ("test_origin", "validation_origin", "intent_validation", "intent_set", "intent_set_4",
        "intent_set_5", "intent_set_6")


def cell(r: dict, key: str) -> str:
    m = r[key]["rows"]["mocae"]
    return f"{m['accuracy']:.3f} / {m['ece']:.3f}"


def main(paths: list[str]) -> None:
    runs = [json.loads(line) for p in paths for line in open(p, encoding="utf-8") if line.strip()]
    by = {(r["seed"], r["arm"]): r for r in runs}
    print("MoCaE accuracy / ECE\n")
    print("| seed | arm | " + " | ".join(SETS) + " | set-6 confidence | set-6 ECE floor |")
    print("| ---: | --- |" + " ---: |" * (len(SETS) + 2))
    for (seed, arm), r in sorted(by.items()):
        s6 = r["intent_set_6"]
        print(f"| {seed} | {arm} | " + " | ".join(cell(r, k) for k in SETS)
              + f" | {s6['confidence_mocae']:.3f} | {s6['ece_if_calibrated']['mocae']['mean']:.3f} |")
    seeds = sorted({s for s, _ in by})
    for arm in ("W", "S"):
        print(f"\n{arm} - B (accuracy / ECE)\n")
        print("| set | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
        print("| --- |" + " ---: |" * (len(seeds) + 1))
        for k in SETS:
            d = [tuple(by[s, arm][k]["rows"]["mocae"][m] - by[s, "B"][k]["rows"]["mocae"][m]
                       for m in ("accuracy", "ece")) for s in seeds]
            mean = np.mean(d, axis=0)
            print(f"| {k} | " + " | ".join(f"{a:+.3f} / {e:+.3f}" for a, e in d)
                  + f" | {mean[0]:+.3f} / {mean[1]:+.3f} |")
    print("\nECE of MoCaE minus raw softmax on the sixth set (paired bootstrap 95% interval):")
    for (seed, arm), r in sorted(by.items()):
        g = r["intent_set_6"]["ece_mocae_minus_raw_softmax"]
        print(f"  seed {seed} {arm}: {g['diff']:+.3f} [{g['ci95_low']:+.3f}, {g['ci95_high']:+.3f}]  "
              f"(raw softmax ECE {r['intent_set_6']['rows']['raw_softmax']['ece']:.3f})")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
