"""Evaluation report: ``report.json``, a Markdown table (systems x metrics) and PNG plots.

The table puts an arrow next to each metric for its direction (↑ higher is better, ↓ lower),
gives each value its 95% bootstrap CI, and names the judge under every column; proxies and
fake judges are labelled as such in the column notes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from alignx.artifacts import write_json_atomic, write_text_atomic

#: (key in a system row, column title, direction arrow)
COLUMNS = (
    ("win_rate", "WR", "↑"),
    ("safety_score", "SS", "↓"),
    ("truthful_informative", "TI", "↑"),
    ("mc1", "MC1", "↑"),
    ("mc2", "MC2", "↑"),
    ("alignment_score", "Avg", "↑"),
)
COST_COLUMNS = (("latency_ms_p50", "latency p50 ms", "↓"), ("peak_rss_mib", "peak RSS MiB", "↓"))


def _fmt(cell: dict[str, Any] | None, ci: bool = True) -> str:
    if not cell or cell.get("value") is None or (isinstance(cell["value"], float)
                                                 and math.isnan(cell["value"])):
        return "—"
    v = f"{cell['value']:.1f}"
    if ci and "low" in cell:
        v += f" [{cell['low']:.1f}, {cell['high']:.1f}]"
    return v


def markdown_table(report: dict[str, Any]) -> str:
    """The systems x metrics table (with the cost columns when costs were measured)."""
    systems = report["systems"]
    costs = report.get("cost", {}).get("systems", {})
    head = [f"{t} {a}" for _, t, a in COLUMNS]
    if costs:
        head += [f"{t} {a}" for _, t, a in COST_COLUMNS]
    lines = ["| system | " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(head)]
    for name, row in systems.items():
        cells = [_fmt(row.get(k)) for k, _, _ in COLUMNS]
        if costs:
            c = costs.get(name, {})
            cells += [f"{c[k]:.0f}" if isinstance(c.get(k), int | float) else "—"
                      for k, _, _ in COST_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = []
    first = next(iter(systems.values()), {})
    for key, title, _ in COLUMNS:
        judge = (first.get(key) or {}).get("judge")
        if judge:
            extra = f" vs {first[key]['vs']}" if key == "win_rate" and "vs" in first[key] else ""
            notes.append(f"- {title}{extra}: {judge}")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def _validity_lines(validity: dict[str, Any]) -> list[str]:
    out = []
    s = validity.get("harmlessness")
    if s:
        out.append(
            f"- safety judge `{s['judge_id']}`: HH-RLHF {s['hh_split']} pairwise accuracy "
            f"{s['hh_pairwise_accuracy']:.1f}% (n={s['hh_pairs']}); hand-labelled set accuracy "
            f"{s['labelled_accuracy']:.1f}%, AUROC {s['labelled_auroc']:.1f}% (n={s['labelled_n']}). "
            f"Limits: {s['limits']}")
    t = validity.get("honesty")
    if t:
        out.append(
            f"- truth judge `{t['judge_id']}`: accuracy {t['accuracy']:.1f}% on {t['answers']} "
            f"TruthfulQA {t['split']} reference answers (balanced {t['balanced_accuracy']:.1f}%). "
            f"Limits: {t['limits']}")
    return out


def markdown_report(report: dict[str, Any]) -> str:
    """The whole Markdown report: table, judges and their validity, routing, costs."""
    lines = [f"# AlignX evaluation — {report['model']}", "",
             f"Run `{report['run_dir']}`; {report['prompts_per_axis']} test prompts per axis "
             f"({report['generation']['max_tokens']} new tokens, temperature "
             f"{report['generation']['temperature']}); 95% bootstrap CIs in brackets.", "",
             markdown_table(report), ""]
    if report.get("fake_judges"):
        lines += ["**FAKE judges were used: these numbers only test the plumbing.**", ""]
    if report.get("judge_validity"):
        lines += ["## Judge validity", "", *_validity_lines(report["judge_validity"]), ""]
    routing = {s: r["routing"] for s, r in report["systems"].items() if r.get("routing")}
    if routing:
        lines += ["## Routing of the test prompts (% of each axis's prompts per expert)", ""]
        for s, r in routing.items():
            lines.append(f"- {s}: " + "; ".join(f"{a} -> {v}" for a, v in r.items()))
        lines.append("")
    cost = report.get("cost")
    if cost:
        lines += ["## Cost", "", cost.get("method", ""), ""]
        if cost.get("claim"):
            lines += [cost["claim"], ""]
    return "\n".join(lines)


def plot_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Per-axis scores by system, and latency/memory by system (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    systems = list(report["systems"])
    paths = []
    keys = [(k, t, a) for k, t, a in COLUMNS if k != "alignment_score"
            and any(k in r for r in report["systems"].values())]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(keys), 4.2))
    width = 0.8 / max(len(systems), 1)
    x = np.arange(len(keys))
    for i, s in enumerate(systems):
        row = report["systems"][s]
        vals = [row.get(k, {}).get("value", np.nan) for k, _, _ in keys]
        lo = [v - row.get(k, {}).get("low", v) for v, (k, _, _) in zip(vals, keys, strict=True)]
        hi = [row.get(k, {}).get("high", v) - v for v, (k, _, _) in zip(vals, keys, strict=True)]
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, yerr=[lo, hi], capsize=2, label=s)
    ax.set_xticks(x, [f"{t} {a}" for _, t, a in keys])
    ax.set_ylabel("%")
    ax.set_title(f"AlignX evaluation: {report['model']} (95% CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out_dir / "scores.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    costs = report.get("cost", {}).get("systems", {})
    if costs:
        names = [s for s in systems if s in costs] or list(costs)
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, (k, t, a) in zip(axes, COST_COLUMNS, strict=True):
            ax.bar(names, [costs[n].get(k, np.nan) or np.nan for n in names], color="tab:gray")
            ax.set_title(f"{t} {a}")
            ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        p = out_dir / "cost.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json`` (last, atomically), ``report.md`` and the plots into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = write_text_atomic(out / "report.md", markdown_report(report))
    plots = plot_report(report, out)
    js = write_json_atomic(out / "report.json", report)
    return {"json": js, "markdown": md, **{p.stem: p for p in plots}}
