"""Rule R1 of ``seeds_4_protocol.md`` on ``readout.py`` lines: is the fourth set adopted as
training seeds? Prints every line's MoCaE accuracy / ECE (raw softmax ECE) and confidence.

    python docs/experiments/seeds_4/decide.py D.jsonl EHALF.jsonl

D is the shipped router of seed 0 (its seeds do not include the fourth set); E-half trains on the
fourth set's seed half (with the T_pool form R2 chose). E is adopted if, on seed 0, all of:
E-half's MoCaE accuracy on the held-out ``set4_decision_half`` is not below D's; its ECE there at
most 0.01 above D's; its accuracy on ``intent_validation`` and on the validation split (origin
labels) at most 1.0 point below D's.
"""

import json
import sys

KEYS = ("validation_origin", "test_origin", "intent_validation", "intent_set",
        "set4_decision_half", "set4_seed_half")


def name(r: dict) -> str:
    half = any("set4_seed_half" in s for s in r["seed_sets"])
    return f"{'E-half' if half else 'D'} ({r['router']}, T_pool {r['pool_temperature']})"


def m(r: dict, key: str) -> dict:
    return r[key]["rows"]["mocae"]


def main(paths: list[str]) -> None:
    runs = [json.loads(line) for p in paths for line in open(p, encoding="utf-8") if line.strip()]
    print("MoCaE accuracy / ECE (raw softmax ECE), mean confidence; seed", runs[0]["seed"])
    for r in runs:
        print(f"\n{name(r)}")
        for k in KEYS:
            raw = r[k]["rows"]["raw_softmax"]["ece"]
            print(f"  {k:<20} {m(r, k)['accuracy']:.3f} / {m(r, k)['ece']:.3f} ({raw:.3f})  "
                  f"conf {r[k]['confidence_mocae']:.3f}  floor "
                  f"{r[k]['ece_if_calibrated']['mocae']['mean']:.3f}")
    if len(runs) != 2 or {name(r)[0] for r in runs} != {"D", "E"}:
        sys.exit("the rule needs one D line and one E-half line")
    d, e = sorted(runs, key=name)
    checks = [
        ("accuracy on set4_decision_half, E - D", m(e, "set4_decision_half")["accuracy"]
         - m(d, "set4_decision_half")["accuracy"], lambda x: x >= 0, ">= 0"),
        ("ECE on set4_decision_half, E - D", m(e, "set4_decision_half")["ece"]
         - m(d, "set4_decision_half")["ece"], lambda x: x <= 0.01, "<= +0.010"),
        ("accuracy on intent_validation, E - D", m(e, "intent_validation")["accuracy"]
         - m(d, "intent_validation")["accuracy"], lambda x: x >= -0.010, ">= -0.010"),
        ("accuracy on validation (origin labels), E - D", m(e, "validation_origin")["accuracy"]
         - m(d, "validation_origin")["accuracy"], lambda x: x >= -0.010, ">= -0.010"),
    ]
    print()
    for label, x, ok, need in checks:
        print(f"{label:<48} {x:+.3f}  (needs {need})  {'ok' if ok(x) else 'FAILS'}")
    print("\nR1: the fourth set as seeds is "
          + ("ADOPTED" if all(ok(x) for _, x, ok, _ in checks) else "NOT adopted"))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1:])
