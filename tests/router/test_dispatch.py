"""The report's dispatch section: what each policy does on labelled prompts (pure)."""

import numpy as np
import pytest

from alignx.axes import AXES, Axis
from alignx.router.dispatch import dispatch_png, policy_outcomes

HELP, HARM, HON = (AXES.index(a) for a in (Axis.HELPFULNESS, Axis.HARMLESSNESS, Axis.HONESTY))


def _weights(rows: list[tuple[float, float, float]]) -> np.ndarray:
    """(helpfulness, harmlessness, honesty) rows -> (N, 3) in AXES order."""
    p = np.zeros((len(rows), 3))
    for i, (a, b, c) in enumerate(rows):
        p[i, [HELP, HARM, HON]] = a, b, c
    return p


def test_outcomes_count_both_safety_mistakes_for_every_policy():
    p = _weights([(0.55, 0.45, 0.0),   # harmful, argmax helpful, barely
                  (0.9, 0.1, 0.0),     # harmful, confidently helpful
                  (0.1, 0.9, 0.0),     # harmful, right
                  (0.6, 0.4, 0.0),     # benign helpful, right but unsure
                  (0.2, 0.1, 0.7)])    # benign honest, right
    y = np.array([HARM, HARM, HARM, HELP, HON])
    out = policy_outcomes(p, y, np.zeros(5, bool), AXES, Axis.HARMLESSNESS,
                          thresholds=(0.5, 0.65), costs=(1.3, 2.0))
    assert out["n"] == 5 and out["harmful"] == 3
    rows = {(r["policy"], r.get("threshold"), (r.get("miss_cost") or {}).get("harmlessness")): r
            for r in out["rows"]}
    top1 = rows[("top1", None, None)]
    assert (top1["harmful_elsewhere"], top1["benign_to_harmlessness"]) == (2, 0)
    assert top1["accuracy"] == pytest.approx(3 / 5) and top1["harmful_elsewhere_share"] == 2 / 3
    # theta 0.65: the 0.55 and 0.6 rows fall back to harmlessness
    t = rows[("threshold", 0.65, None)]
    assert (t["harmful_elsewhere"], t["benign_to_harmlessness"]) == (1, 1)
    # c 1.3: 1.3 * 0.45 > 0.55 moves the first row only; c 2: 0.8 > 0.6 moves the benign one too
    c13, c2 = rows[("cost", None, 1.3)], rows[("cost", None, 2.0)]
    assert (c13["harmful_elsewhere"], c13["benign_to_harmlessness"]) == (1, 0)
    assert (c2["harmful_elsewhere"], c2["benign_to_harmlessness"]) == (1, 1)
    assert c13["accuracy"] == pytest.approx(4 / 5)


def test_ood_requests_go_to_the_fallback_except_under_top1():
    p = _weights([(0.9, 0.1, 0.0)])
    out = policy_outcomes(p, np.array([HARM]), np.array([True]), AXES, Axis.HARMLESSNESS,
                          thresholds=(0.5,), costs=(1.5,))
    assert [r["harmful_elsewhere"] for r in out["rows"]] == [1, 0, 0]


def test_no_harmlessness_axis_gives_nothing_and_the_plot_is_written(tmp_path):
    two = [Axis.HELPFULNESS, Axis.HONESTY]
    assert policy_outcomes(np.array([[0.5, 0.5]]), np.array([0]), np.zeros(1, bool), two,
                           Axis.HELPFULNESS) is None
    p = _weights([(0.55, 0.45, 0.0), (0.6, 0.4, 0.0)])
    out = policy_outcomes(p, np.array([HARM, HELP]), np.zeros(2, bool), AXES, Axis.HARMLESSNESS)
    path = dispatch_png({"set": out, "none": None}, tmp_path / "d.png", "t")
    assert path.read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob("*.tmp.png"))
