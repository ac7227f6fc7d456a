"""Apply the pre-registered rule of ``shift_calibration_protocol.md`` to ``readout.py`` lines
and print the comparison.

    python docs/experiments/shift_calibration/decide.py C.jsonl DHALF.jsonl

C is the shipped router of seed 0 (no calibration sets); D-half calibrates on the third set's
``set3_calibration_half.jsonl``. D is adopted if, on seed 0, all of: D-half's MoCaE ECE on the
held-out ``set3_decision_half`` is at least 0.02 below C's; its accuracy there is not below
C's; its accuracy on ``intent_validation`` and on the validation split (origin labels) is at
most 1.0 point below C's. Ablation lines (a refit without calibration prompts) are printed
for the record and never decide.
"""

import json
import sys

KEYS = ("validation_origin", "intent_validation", "intent_set", "set3_decision_half",
        "set3_calibration_half", "intent_set_2")


def rows(paths: list[str]) -> list[dict]:
    return [json.loads(line) for p in paths for line in open(p, encoding="utf-8") if line.strip()]


def name(r: dict) -> str:
    if r.get("ablation"):
        return "D-half, refit without calibration prompts"
    return "D-half" if r["calibration_sets"] else "C"


def m(r: dict, key: str) -> dict:
    return r[key]["rows"]["mocae"]


def main(paths: list[str]) -> None:
    runs = rows(paths)
    print("MoCaE accuracy / ECE (raw softmax ECE), mean confidence; seed", runs[0]["seed"])
    for r in runs:
        print(f"\n{name(r)}")
        for k in KEYS:
            raw = r[k]["rows"]["raw_softmax"]["ece"]
            g = r[k]["ece_mocae_minus_raw_softmax"]
            print(f"  {k:<22} {m(r, k)['accuracy']:.3f} / {m(r, k)['ece']:.3f} ({raw:.3f})  "
                  f"conf {r[k]['confidence_mocae']:.3f}  gap {g['diff']:+.3f} "
                  f"[{g['ci95_low']:+.3f}, {g['ci95_high']:+.3f}]  "
                  f"floor {r[k]['ece_if_calibrated']['mocae']['mean']:.3f}")
    by = {name(r): r for r in runs if r["seed"] == 0}
    if "C" not in by or "D-half" not in by:
        sys.exit("the rule needs C and D-half on seed 0")
    c, d = by["C"], by["D-half"]
    checks = [
        ("ECE on set3_decision_half, D - C", m(d, "set3_decision_half")["ece"]
         - m(c, "set3_decision_half")["ece"], lambda x: x <= -0.02, "<= -0.020"),
        ("accuracy on set3_decision_half, D - C", m(d, "set3_decision_half")["accuracy"]
         - m(c, "set3_decision_half")["accuracy"], lambda x: x >= 0, ">= 0"),
        ("accuracy on intent_validation, D - C", m(d, "intent_validation")["accuracy"]
         - m(c, "intent_validation")["accuracy"], lambda x: x >= -0.010, ">= -0.010"),
        ("accuracy on validation (origin labels), D - C", m(d, "validation_origin")["accuracy"]
         - m(c, "validation_origin")["accuracy"], lambda x: x >= -0.010, ">= -0.010"),
    ]
    print("\nrule (seed 0):")
    for label, x, ok, need in checks:
        print(f"  {label:<48} {x:+.3f}  needs {need:<10} {'ok' if ok(x) else 'FAILS'}")
    adopt = all(ok(x) for _, x, ok, _ in checks)
    print("decision:", "adopt D (seed_sets + intent_set_2.jsonl, calibration_sets "
          "[intent_set_3.jsonl])" if adopt else "keep C")


if __name__ == "__main__":
    main(sys.argv[1:])
