"""The rule of ``finetune_select_protocol.md`` on ``readout.py`` lines of seeds 1 and 2.

Prints, per seed and arm, MoCaE accuracy / ECE (raw softmax ECE) and mean confidence on every set
read, then the rule: an arm X in {S, W} passes if, averaged over seeds 1 and 2, its MoCaE
accuracy on the fourth set is at least 0.005 above B's, its ECE there at most 0.005 above B's,
and its accuracy on ``intent_validation`` and on the validation split (origin labels) at most
1.0 point below B's. Of two passing arms the larger fourth-set gain is adopted.

    python docs/experiments/finetune_select/decide.py fs1.readout.jsonl fs2.readout.jsonl
"""

import json
import sys

import numpy as np

KEYS = ("validation_origin", "intent_validation", "intent_set", "intent_set_4")
DECISION_SEEDS = (1, 2)


def m(r: dict, key: str, metric: str) -> float:
    return r[key]["rows"]["mocae"][metric]


def main(paths: list[str]) -> None:
    runs = [json.loads(line) for p in paths for line in open(p, encoding="utf-8") if line.strip()]
    by = {(r["seed"], r["arm"]): r for r in runs}
    if not all((s, a) in by for s in DECISION_SEEDS for a in "BSW"):
        sys.exit(f"the rule needs arms B, S, W of seeds {DECISION_SEEDS}; got {sorted(by)}")
    print("MoCaE accuracy / ECE (raw softmax ECE), mean confidence")
    for (seed, arm), r in sorted(by.items()):
        chosen = r["averaged_steps"] or r["best_step"]
        print(f"\nseed {seed}, arm {arm} (steps {chosen})")
        for k in KEYS:
            print(f"  {k:<18} {m(r, k, 'accuracy'):.3f} / {m(r, k, 'ece'):.3f} "
                  f"({r[k]['rows']['raw_softmax']['ece']:.3f})  conf {r[k]['confidence_mocae']:.3f}")

    def diff(arm: str, key: str, metric: str) -> float:
        return float(np.mean([m(by[s, arm], key, metric) - m(by[s, "B"], key, metric)
                              for s in DECISION_SEEDS]))

    gains = {}
    for arm in "SW":
        checks = [
            ("accuracy on intent_set_4", diff(arm, "intent_set_4", "accuracy"),
             lambda x: x >= 0.005, ">= +0.005"),
            ("ECE on intent_set_4", diff(arm, "intent_set_4", "ece"),
             lambda x: x <= 0.005, "<= +0.005"),
            ("accuracy on intent_validation", diff(arm, "intent_validation", "accuracy"),
             lambda x: x >= -0.010, ">= -0.010"),
            ("accuracy on validation (origin labels)", diff(arm, "validation_origin", "accuracy"),
             lambda x: x >= -0.010, ">= -0.010"),
        ]
        print(f"\n{arm} - B, mean over seeds {DECISION_SEEDS}:")
        for label, x, ok, need in checks:
            print(f"  {label:<42} {x:+.4f}  (needs {need})  {'ok' if ok(x) else 'FAILS'}")
        if all(ok(x) for _, x, ok, _ in checks):
            gains[arm] = checks[0][1]
    print("\nadopted: " + (max(gains, key=gains.get) if gains else "none (B, the shipped rule, stays)"))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
