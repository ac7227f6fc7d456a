"""Where a saved router errs on frozen intent sets (2 and 3 unless ``--sets`` names others):
confusion matrix, recall per intent, accuracy by theme and for the writers' boundary cases, and
the most confident errors. Reporting only (``intent_seeds_2_protocol.md``,
``shift_calibration_protocol.md``): nothing is chosen on it.

    python docs/experiments/intent_seeds_2/breakdown.py [--sets intent_set_4.jsonl] RUN_DIR [RUN_DIR ...]
"""

import collections
import json
import sys
from importlib import resources
from pathlib import Path

import numpy as np

from alignx.config import load_config
from alignx.router.serving import load


def rows(name: str) -> list[dict]:
    text = resources.files("alignx.router").joinpath(name).read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def breakdown(run_dir: Path, sets: tuple[str, ...] = ("intent_set_2.jsonl", "intent_set_3.jsonl"),
              n_errors: int = 8) -> None:
    cfg = load_config(run_dir / "router" / "config.yaml")
    cr = load(run_dir)
    axes = [a.value for a in cr.router.axes]
    encoder = cr.build_encoder(cfg.model)
    report = json.loads((run_dir / "router" / "router_report.json").read_text())
    # a report from before router.seed_sets existed was trained on the first seed file alone
    print(f"== {run_dir} (seed {cfg.seed}, seeds {report.get('seed_sets', ['intent_seeds.jsonl'])})")
    for name in sets:
        rs = rows(name)
        y = np.array([axes.index(r["axis"]) for r in rs])
        p = cr.router.predict(encoder.encode([r["prompt"] for r in rs])).weights  # (N, A)
        pred, conf = p.argmax(1), p.max(1)
        ok = pred == y
        print(f"\n{name}: accuracy {ok.mean():.3f}, mean confidence {conf.mean():.3f} (n {len(y)})")
        cm = np.zeros((len(axes), len(axes)), dtype=int)
        np.add.at(cm, (y, pred), 1)
        print("  confusion (rows: label, columns: routed to " + ", ".join(axes) + ")")
        for a, row in zip(axes, cm, strict=True):
            print(f"    {a:<13} {row.tolist()}  recall {row[axes.index(a)] / row.sum():.3f}")
        by_theme = collections.defaultdict(list)
        for r, good in zip(rs, ok, strict=True):
            by_theme[r.get("theme", "-")].append(good)
        print("  by theme: " + ", ".join(f"{t} {np.mean(v):.3f} ({len(v)})"
                                         for t, v in sorted(by_theme.items())))
        boundary = np.array(["boundary" in r.get("note", "").lower() for r in rs])
        print(f"  boundary cases {ok[boundary].mean():.3f} ({boundary.sum()}), "
              f"others {ok[~boundary].mean():.3f} ({(~boundary).sum()})")
        print("  most confident errors:")
        for i in np.argsort(-np.where(ok, -1.0, conf))[:n_errors]:
            print(f"    {conf[i]:.2f} {rs[i]['axis'][:5]}->{axes[pred[i]][:5]} "
                  f"{rs[i]['prompt'][:110]!r}")


if __name__ == "__main__":
    args = sys.argv[1:]
    sets = ("intent_set_2.jsonl", "intent_set_3.jsonl")
    if args[:1] == ["--sets"] and len(args) >= 2:
        sets, args = tuple(args[1].split(",")), args[2:]
    if not args:
        sys.exit(__doc__)
    for arg in args:
        breakdown(Path(arg), sets)
