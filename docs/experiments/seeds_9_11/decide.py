"""The decision of ../seeds_9_11_protocol.md from the readout's JSON lines (seeds 0 and 1 of
W38, then of Y): the four conditions on the seed means, MoCaE row.

    python docs/experiments/seeds_boundary/readout.py --decision 12 \\
        /tmp/runs/vw38_0 /tmp/runs/d1 /tmp/runs/y0 /tmp/runs/y1 > readout_decision.jsonl
    python docs/experiments/seeds_9_11/decide.py readout_decision.jsonl
"""
import json
import sys

# (report key, metric, the candidate's mean minus W38's must be ..., bound)
RULE = [("intent_set_12", "accuracy", ">=", 0.010), ("intent_set_12", "ece", "<=", 0.005),
        ("test", "accuracy", ">=", -0.005), ("intent_validation", "accuracy", ">=", -0.010)]


def mean(rows: list[dict], key: str, metric: str) -> float:
    return sum(r[key][metric] for r in rows) / len(rows)


def decide(rows: list[dict]) -> bool:
    """Print each condition and return whether Y (the last two rows) is adopted."""
    if len(rows) != 4:
        raise SystemExit(f"want 4 readout lines (W38 seeds 0, 1, then Y seeds 0, 1), got {len(rows)}")
    base, cand = rows[:2], rows[2:]
    ok = True
    for i, (key, metric, op, bound) in enumerate(RULE, 1):
        b, c = mean(base, key, metric), mean(cand, key, metric)
        d = round(c - b, 6)  # the readout rounds to 4 places; no float edge
        holds = d >= bound if op == ">=" else d <= bound
        ok &= holds
        print(f"{i}. {key} {metric}: W38 {b:.4f}, Y {c:.4f}, "
              f"difference {d:+.4f} (needs {op} {bound:+.3f}): {'holds' if holds else 'FAILS'}")
    print("Y is adopted" if ok else "Y is not adopted; W38 stays")
    return ok


if __name__ == "__main__":
    decide([json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")])
