"""What each dispatch policy does on labelled prompts (the report's ``dispatch`` section).

A calibrated router's weights are worth most when the dispatch uses them as probabilities. The
two mistakes that matter on the safety axis pull in opposite directions: a harmful request sent
to another expert (the Axis Collapse the paper names), and a benign request sent to the
cautious expert (lost helpfulness). :func:`policy_outcomes` counts both, with the accuracy of
the chosen expert, for ``top1``, the ``threshold`` policy at several thresholds and the
``cost`` policy at several harmlessness miss costs (:func:`alignx.router.mocae.route`);
:func:`dispatch_png` draws them as one trade-off curve per policy and set, so an operator can
pick ``router.threshold`` or ``router.miss_cost`` from the evaluation sets rather than guess.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alignx.axes import Axis
from alignx.router.mocae import route
from alignx.router.plots import save_png

__all__ = ["HARM_COSTS", "THRESHOLDS", "dispatch_png", "policy_outcomes"]

#: thresholds of the ``threshold`` rows (0.5 is the shipped default)
THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
#: harmlessness miss costs of the ``cost`` rows (the other axes cost 1)
HARM_COSTS: tuple[float, ...] = (1.5, 2.0, 3.0, 5.0, 8.0)


def policy_outcomes(
    p: np.ndarray, y: np.ndarray, ood: np.ndarray, axes: Sequence[Axis], fallback: Axis,
    thresholds: Sequence[float] = THRESHOLDS, costs: Sequence[float] = HARM_COSTS,
) -> dict[str, Any] | None:
    """Outcome of every policy row on labelled prompts.

    Args:
        p: the router's weights (N, A) in ``axes`` order.
        y: (N,) label indices into ``axes`` (the right expert).
        ood: (N,) the served OOD flags.
        axes: the router's axes; ``None`` is returned when harmlessness is not among them.
        fallback: the expert of unsure (``threshold``) and OOD (``threshold``, ``cost``) rows.
        thresholds, costs: the settings of the ``threshold`` and ``cost`` rows.

    Returns:
        ``{"n", "harmful", "rows": [...]}``; each row names its policy (and ``threshold`` or
        ``miss_cost``) and gives ``accuracy`` (share sent to their right expert),
        ``harmful_elsewhere`` (harmful prompts sent to another expert, count and share of the
        harmful) and ``benign_to_harmlessness`` (the same for the other prompts).
    """
    if Axis.HARMLESSNESS not in axes:
        return None
    y = np.asarray(y)
    harm_idx = list(axes).index(Axis.HARMLESSNESS)
    harmful = y == harm_idx  # (N,)
    n_harm, n_benign = int(harmful.sum()), int((~harmful).sum())

    def row(chosen: np.ndarray, **setting: Any) -> dict[str, Any]:
        elsewhere = int((harmful & (chosen != harm_idx)).sum())
        cautious = int((~harmful & (chosen == harm_idx)).sum())
        return {**setting, "accuracy": float((chosen == y).mean()) if len(y) else float("nan"),
                "harmful_elsewhere": elsewhere,
                "harmful_elsewhere_share": elsewhere / n_harm if n_harm else float("nan"),
                "benign_to_harmlessness": cautious,
                "benign_to_harmlessness_share": cautious / n_benign if n_benign else float("nan")}

    conf = p.max(axis=1)
    rows = [row(route(p, conf, ood, "top1", axes=axes), policy="top1")]
    rows += [row(route(p, conf, ood, "threshold", t, fallback, axes), policy="threshold",
                 threshold=float(t)) for t in thresholds]
    rows += [row(route(p, conf, ood, "cost", fallback=fallback, axes=axes,
                       miss_cost={Axis.HARMLESSNESS: c}),
                 policy="cost", miss_cost={Axis.HARMLESSNESS.value: float(c)}) for c in costs]
    return {"n": len(y), "harmful": n_harm, "rows": rows}


def dispatch_png(panels: Mapping[str, dict[str, Any]], path: Path, title: str) -> Path:
    """One panel per set: harmful prompts sent elsewhere against benign prompts sent to the
    cautious expert (shares), one curve per policy, ``top1`` as a star; written atomically.

    Args:
        panels: panel title -> :func:`policy_outcomes`'s result (``None`` panels are skipped).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {k: v for k, v in panels.items() if v is not None}
    n = max(1, len(panels))
    fig, axs = plt.subplots(1, n, figsize=(4.3 * n, 4.2), squeeze=False)
    for j, (name, out) in enumerate(panels.items()):
        ax = axs[0, j]
        for policy, label, marker, key in (("threshold", "threshold θ", "o", "threshold"),
                                           ("cost", "cost c (harmlessness)", "s", "miss_cost")):
            rows = [r for r in out["rows"] if r["policy"] == policy]
            x = [r["benign_to_harmlessness_share"] for r in rows]
            yy = [r["harmful_elsewhere_share"] for r in rows]
            line, = ax.plot(x, yy, marker + "-", ms=4, label=label)
            for r, xi, yi in zip(rows, x, yy, strict=True):
                v = r[key] if policy == "threshold" else r[key]["harmlessness"]
                ax.annotate(f"{v:g}", (xi, yi), fontsize=6, color=line.get_color(),
                            xytext=(3, 3), textcoords="offset points")
        top = next(r for r in out["rows"] if r["policy"] == "top1")
        ax.plot([top["benign_to_harmlessness_share"]], [top["harmful_elsewhere_share"]], "k*",
                ms=9, label="top1")
        ax.set(title=f"{name} (n={out['n']}, harmful {out['harmful']})",
               xlabel="benign prompts sent to harmlessness (share)",
               ylabel="harmful prompts sent elsewhere (share)" if j == 0 else None)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_png(fig, path, title)
