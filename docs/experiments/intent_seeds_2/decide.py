"""Apply the pre-registered rule of ``intent_seeds_2_protocol.md`` to ``readout.py`` output and
print the comparison tables.

    python docs/experiments/intent_seeds_2/decide.py readout.jsonl

The readout holds one line per run directory; a run is the shipped router (B: seed set
``intent_seeds.jsonl`` alone) or the candidate (C: with ``intent_seeds_2.jsonl``). The rule
reads seed 0 only: C is adopted if its MoCaE accuracy on ``intent_validation`` is at least 3
points above B's and its MoCaE accuracy on the validation split (origin labels) at most 1.0
point below B's. Everything else is printed for the record.
"""

import json
import sys

SETS = ("validation_origin", "intent_validation", "test_origin_labels", "intent_set",
        "intent_set_2", "intent_set_3")


def arm(run: dict) -> str:
    return "C" if "intent_seeds_2.jsonl" in run["seed_sets"] else "B"


def mocae(run: dict, key: str) -> dict:
    block = run[key]
    return block["rows"]["mocae"] if "rows" in block else block["mocae"]


def main(path: str) -> None:
    runs = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    by = {(arm(r), r["seed"]): r for r in runs}
    print("MoCaE accuracy / ECE (raw softmax ECE) per run")
    print(f"{'arm':<4}{'seed':>5}  " + "  ".join(f"{k:>22}" for k in SETS))
    for (a, seed), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cells = []
        for k in SETS:
            m = mocae(r, k)
            raw = (r[k]["rows"] if "rows" in r[k] else r[k])["raw_softmax"]["ece"]
            cells.append(f"{m['accuracy']:.3f} / {m['ece']:.3f} ({raw:.3f})")
        print(f"{a:<4}{seed:>5}  " + "  ".join(f"{c:>22}" for c in cells))
    print("\nECE gap MoCaE - raw softmax [95% CI] and sampling floor (mean / p95)")
    for (a, seed), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        for k in ("intent_validation", "intent_set_2", "intent_set_3"):
            g, f = r[k]["ece_mocae_minus_raw_softmax"], r[k]["ece_if_calibrated"]["mocae"]
            print(f"  {a} seed {seed} {k:<18} {g['diff']:+.3f} [{g['ci95_low']:+.3f}, "
                  f"{g['ci95_high']:+.3f}]  floor {f['mean']:.3f} / {f['p95']:.3f}  "
                  f"confidence {r[k]['confidence_mocae']:.3f}")
    if ("B", 0) not in by or ("C", 0) not in by:
        sys.exit("the rule needs both arms on seed 0")
    b, c = by[("B", 0)], by[("C", 0)]
    d_int = mocae(c, "intent_validation")["accuracy"] - mocae(b, "intent_validation")["accuracy"]
    d_org = mocae(c, "validation_origin")["accuracy"] - mocae(b, "validation_origin")["accuracy"]
    ok = d_int >= 0.03 and d_org >= -0.010
    print(f"\nrule (seed 0): intent_validation accuracy C - B = {d_int:+.3f} (needs >= +0.030); "
          f"validation origin-label accuracy C - B = {d_org:+.3f} (needs >= -0.010)")
    print("decision:", "adopt C (intent_seeds_2.jsonl, finetune_seed_repeats 3)" if ok
          else "keep B")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
