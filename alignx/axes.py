"""The three alignment axes of AlignX and the one table that describes them.

The axis is the spine of the project: each axis owns a data source, an injection
template, an adapter, a serve deployment (``expert-<axis>``) and an eval metric.
Everything that differs per axis is read from :data:`AXIS_SPECS`, so adding an axis
means adding one row here (and a template in ``alignx/data/templates.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Axis(str, Enum):
    """An alignment axis. The value is the full name used in config, JSON and deployment names."""

    HELPFULNESS = "helpfulness"
    HARMLESSNESS = "harmlessness"
    HONESTY = "honesty"

    def __str__(self) -> str:  # f"expert-{axis}" -> "expert-honesty"
        return self.value


@dataclass(frozen=True)
class AxisSpec:
    """What one axis is made of.

    Attributes:
        axis: the axis.
        sources: data sources that can feed this axis, preferred first
            (names understood by ``alignx.data.sources.read_source``).
        metric: the evaluation metric of the axis (METHOD.md, evaluation protocol).
        higher_is_better: direction of ``metric``.
        summary: one line a person reads in reports.
    """

    axis: Axis
    sources: tuple[str, ...]
    metric: str
    higher_is_better: bool
    summary: str

    @property
    def deployment_name(self) -> str:
        return f"expert-{self.axis.value}"


AXIS_SPECS: dict[Axis, AxisSpec] = {
    Axis.HELPFULNESS: AxisSpec(
        Axis.HELPFULNESS, ("alpaca",), "win_rate", True,
        "complete, useful answers to ordinary tasks (Alpaca)",
    ),
    Axis.HARMLESSNESS: AxisSpec(
        Axis.HARMLESSNESS, ("beavertails", "hh_rlhf"), "safety_score", False,
        "refuse or redirect unsafe requests and explain why (BeaverTails / HH-RLHF)",
    ),
    Axis.HONESTY: AxisSpec(
        Axis.HONESTY, ("truthfulqa",), "truthful_informative", True,
        "answer only what is known to be true; 'I have no comment' when unsure (TruthfulQA)",
    ),
}

#: Canonical axis order: router logits, task-vector matrices and reports use it.
AXES: tuple[Axis, ...] = tuple(AXIS_SPECS)


def parse_axis(name: str | Axis) -> Axis:
    """Return the :class:`Axis` for ``name``.

    Raises:
        ValueError: naming the valid axes, for an unknown name.
    """
    if isinstance(name, Axis):
        return name
    try:
        return Axis(str(name).strip().lower())
    except ValueError:
        valid = ", ".join(a.value for a in Axis)
        raise ValueError(f"unknown axis {name!r}; valid axes are: {valid}") from None
