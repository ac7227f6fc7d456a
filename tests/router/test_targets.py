"""Intent targets: label propagation from seeds relabels noisy dataset-of-origin labels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alignx.axes import AXES, Axis
from alignx.router.targets import build_intent_targets, read_intent_prompts

HELP, HARM, HONEST = (AXES.index(a) for a in (Axis.HELPFULNESS, Axis.HARMLESSNESS, Axis.HONESTY))


def _blob(centre: int, n: int, rng: np.random.Generator, d: int = 6) -> np.ndarray:
    return np.eye(d)[centre] + 0.05 * rng.standard_normal((n, d))


@pytest.fixture(scope="module")
def world():
    """Three intent regions; the HH-RLHF origin (harmlessness) also covers the benign one."""
    rng = np.random.default_rng(0)
    parts = [
        ("alpaca in benign region", _blob(0, 60, rng), HELP),
        ("hh in benign region", _blob(0, 20, rng), HARM),  # benign HH prompts: noisy label
        ("hh in harmful region", _blob(1, 60, rng), HARM),
        ("tqa in misconception region", _blob(2, 40, rng), HONEST),
        ("tqa in benign region", _blob(0, 5, rng), HONEST),  # TruthfulQA must stay honesty
    ]
    h = np.concatenate([p[1] for p in parts])
    origin = np.concatenate([np.full(len(p[1]), p[2]) for p in parts])
    group = np.concatenate([np.full(len(p[1]), i) for i, p in enumerate(parts)])
    seeds = np.concatenate([_blob(0, 5, rng), _blob(1, 5, rng), _blob(2, 5, rng)])
    y_seed = np.repeat([HELP, HARM, HONEST], 5)
    return h, origin, group, seeds, y_seed


def test_benign_prompts_of_the_harmful_source_become_helpfulness(world) -> None:
    h, origin, group, seeds, y_seed = world
    res = build_intent_targets(h, origin, seeds, y_seed, n_neighbors=8)
    assert (res.labels[group == 1] == HELP).all()  # relabelled
    assert (res.labels[group == 0] == HELP).all()
    assert (res.labels[group == 2] == HARM).all()  # harmful intent keeps harmlessness
    assert (res.labels[group == 3] == HONEST).all()
    assert (res.labels[group == 4] == HONEST).all()  # transition not allowed
    np.testing.assert_array_equal(res.changed, res.labels != origin)
    np.testing.assert_allclose(res.scores.sum(axis=1), 1.0)
    trans = res.transitions(origin)
    assert trans[HARM, HELP] == 20 and trans.sum() == len(h)


def test_a_large_margin_keeps_the_origin_labels(world) -> None:
    h, origin, _, seeds, y_seed = world
    res = build_intent_targets(h, origin, seeds, y_seed, margin=1.0)
    np.testing.assert_array_equal(res.labels, origin)


def test_axis_names_are_accepted(world) -> None:
    h, origin, _, seeds, y_seed = world
    names = [AXES[i].value for i in y_seed]
    a = build_intent_targets(h, origin, seeds, names).labels
    b = build_intent_targets(h, origin, seeds, y_seed).labels
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"y_seed": np.full(15, HELP)}, "no seed for axis"),
        ({"h_seed": np.zeros((15, 4))}, "dimension"),
        ({"origin": np.zeros(3, dtype=int)}, "origin must have shape"),
        ({"h": np.zeros((0, 6))}, "h must be a non-empty"),
        ({"alpha": 1.0}, "alpha"),
    ],
)
def test_bad_input_raises(world, change: dict, match: str) -> None:
    h, origin, _, seeds, y_seed = world
    kwargs = {"h": h, "origin": origin, "h_seed": seeds, "y_seed": y_seed, **change}
    with pytest.raises(ValueError, match=match):
        build_intent_targets(**kwargs)


def test_shipped_seed_and_intent_sets_are_valid_and_disjoint() -> None:
    seeds, seed_axes = read_intent_prompts(name="intent_seeds.jsonl")
    frozen, frozen_axes = read_intent_prompts(name="intent_set.jsonl")
    assert len(frozen) >= 150
    for axes in (seed_axes, frozen_axes):
        counts = {a: axes.count(a) for a in AXES}
        assert min(counts.values()) >= 50, counts
    norm = {p.strip().lower() for p in seeds}
    assert not norm & {p.strip().lower() for p in frozen}


def test_read_intent_prompts_rejects_bad_lines(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(ValueError, match="needs 'prompt' and 'axis'"):
        read_intent_prompts(bad)
    bad.write_text(json.dumps({"prompt": "hi", "axis": "kindness"}) + "\n")
    with pytest.raises(ValueError, match="unknown axis"):
        read_intent_prompts(bad)
