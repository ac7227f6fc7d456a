"""Readout of docs/experiments/seed_soup_protocol.md: MoCaE accuracy / ECE of the members, their
soup (S) and their ensemble (E: the mean of the members' MoCaE weights) on the same prompts.

    python docs/experiments/seed_soup/readout.py --soup S_RUN MEMBER_RUN... [--set-9]

Every router scores the same texts: the soup run's test split (seed 0's subsample of the
held-out dataset prompts, origin labels), intent_validation.jsonl, sets 5-8 (the decision
data, also pooled) and, with --set-9, the ninth set (the measurement, once). Each router embeds
through its own saved encoder and served feature function. Prints one JSON line per router
(members, S, E), the member mean, and the decision of the protocol's rule for S.
"""
import json
import sys
from pathlib import Path

import numpy as np

from alignx.config import load_config
from alignx.router import metrics
from alignx.router.calibrate import gather_prompts
from alignx.router.serving import load
from alignx.router.targets import read_intent_prompts

DECISION = ("intent_set_5.jsonl", "intent_set_6.jsonl", "intent_set_7.jsonl", "intent_set_8.jsonl")
POOLED = "sets_5_6_7_8"


def texts_and_labels(soup_run: str, measure: bool) -> dict[str, tuple[list[str], list[str]]]:
    cfg = load_config(Path(soup_run) / "router" / "config.yaml")
    texts, y = gather_prompts(cfg, "test")
    out = {"test": (texts, [cfg.axes[i].value for i in y])}
    for name in ("intent_validation.jsonl", *DECISION, *(("intent_set_9.jsonl",) if measure else ())):
        t, axes = read_intent_prompts(name=name)
        out[name.removesuffix(".jsonl")] = (t, [a.value for a in axes])
    return out


def weights(run: str, data: dict[str, tuple[list[str], list[str]]]) -> tuple[list[str], dict]:
    """The run's MoCaE weights (N, A) per set and its axes order."""
    cr = load(run)
    embed = cr.features(cr.build_encoder(load_config(Path(run) / "router" / "config.yaml").model))
    out = {}
    for name, (texts, _) in data.items():
        h, _ = cr.split(embed(texts))
        out[name] = cr.router.predict(h).weights
    return [a.value for a in cr.axes], out


def scores(p: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    p = {**p, POOLED: np.concatenate([p[n.removesuffix(".jsonl")] for n in DECISION])}
    y = {**y, POOLED: np.concatenate([y[n.removesuffix(".jsonl")] for n in DECISION])}
    return {k: {"accuracy": round(metrics.accuracy(p[k], y[k]), 4),
                "ece": round(metrics.ece(p[k], y[k], 15), 4)} for k in p}


def main(argv: list[str]) -> None:
    measure = "--set-9" in argv
    argv = [a for a in argv if a != "--set-9"]
    if argv[:1] != ["--soup"] or len(argv) < 4:
        raise SystemExit(__doc__)
    soup, members = argv[1], argv[2:]
    data = texts_and_labels(soup, measure)
    probs, axes_order = {}, None
    for run in [*members, soup]:
        axes, probs[run] = weights(run, data)
        assert axes_order in (None, axes), (run, axes, axes_order)
        axes_order = axes
    y = {k: np.array([axes_order.index(a) for a in labels]) for k, (_, labels) in data.items()}
    rows = {run: scores(probs[run], y) for run in [*members, soup]}
    seed = load_config(Path(soup) / "router" / "config.yaml").seed
    for run in [*members, soup]:  # a router of the soup's seed scored its own test split
        report = json.loads((Path(run) / "router" / "router_report.json").read_text())
        if load_config(Path(run) / "router" / "config.yaml").seed == seed:
            theirs = report["test_origin_labels"]["mocae"]
            assert abs(rows[run]["test"]["accuracy"] - theirs["accuracy"]) < 1e-3, (run, theirs)
            assert abs(rows[run]["test"]["ece"] - theirs["ece"]) < 2e-3, (run, theirs)
    rows["E"] = scores({k: np.mean([probs[m][k] for m in members], axis=0) for k in data}, y)
    rows["member_mean"] = {k: {m: round(float(np.mean([rows[r][k][m] for r in members])), 4)
                               for m in ("accuracy", "ece")} for k in rows[soup]}
    for name, row in rows.items():
        print(json.dumps({"router": name if name in ("E", "member_mean") else
                          ("S " if name == soup else "member ") + name, **row}), flush=True)
    s, m = rows[soup], rows["member_mean"]
    rule = {"1. accuracy, sets 5-8 pooled >= +0.010": s[POOLED]["accuracy"] - m[POOLED]["accuracy"] >= 0.010,
            "2. ECE, sets 5-8 pooled <= +0.005": s[POOLED]["ece"] - m[POOLED]["ece"] <= 0.005,
            "3. accuracy, test split >= -0.005": s["test"]["accuracy"] - m["test"]["accuracy"] >= -0.005,
            "4. accuracy, intent validation >= -0.010":
                s["intent_validation"]["accuracy"] - m["intent_validation"]["accuracy"] >= -0.010}
    print(json.dumps({"S_minus_member_mean": {k: {q: round(s[k][q] - m[k][q], 4) for q in ("accuracy", "ece")}
                                              for k in s}, "rule": rule, "adopt_S": all(rule.values())}))


if __name__ == "__main__":
    main(sys.argv[1:])
