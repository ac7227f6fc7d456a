"""Intent targets: label propagation from seeds relabels noisy dataset-of-origin labels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alignx.axes import AXES, Axis
from alignx.router.targets import (
    EVALUATION_SETS,
    SHIPPED_SEED_SETS,
    build_intent_targets,
    choose_relabel_margin,
    read_intent_prompts,
    read_seed_sets,
)

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


def test_a_run_on_two_axes_uses_the_transitions_inside_them(world) -> None:
    h, origin, group, seeds, y_seed = world
    keep, seed_keep = origin != HONEST, y_seed != HONEST  # helpfulness + harmlessness only
    res = build_intent_targets(h[keep], origin[keep], seeds[seed_keep], y_seed[seed_keep],
                               axes=[Axis.HELPFULNESS, Axis.HARMLESSNESS], n_neighbors=8)
    g = group[keep]
    assert res.scores.shape == (int(keep.sum()), 2) and set(res.labels) <= {HELP, HARM}
    assert (res.labels[g == 1] == HELP).all() and (res.labels[g == 2] == HARM).all()


def test_a_large_margin_keeps_the_origin_labels(world) -> None:
    h, origin, _, seeds, y_seed = world
    res = build_intent_targets(h, origin, seeds, y_seed, margin=1.0)
    np.testing.assert_array_equal(res.labels, origin)


def test_at_margin_redecides_without_a_new_propagation(world) -> None:
    h, origin, _, seeds, y_seed = world
    res = build_intent_targets(h, origin, seeds, y_seed, n_neighbors=8)
    for m in (0.0, 0.3, 0.9, 1.0):
        direct = build_intent_targets(h, origin, seeds, y_seed, n_neighbors=8, margin=m)
        np.testing.assert_array_equal(res.at_margin(origin, m).labels, direct.labels)
    assert res.at_margin(origin, 1.0).changed.sum() == 0


def _knn_fit(calls: list, k: int = 7):
    """A weighted k-nearest-neighbour vote router; records what it was fitted on."""

    def fit(h, y, w):
        calls.append(h)

        def predict(x):
            d = ((x[:, None, :] - h[None]) ** 2).sum(-1)  # (n, N)
            nb = np.argsort(d, axis=1)[:, :k]
            votes = np.zeros((len(x), 3))
            for a in range(3):
                votes[:, a] = (w[nb] * (y[nb] == a)).sum(1)
            return (votes + 1e-9) / (votes + 1e-9).sum(1, keepdims=True)

        return predict

    return fit


def test_margin_choice_follows_the_seeds_when_validation_labels_are_clean(world) -> None:
    """The benign HH prompts sit in train only and out-vote the benign seeds until they are
    relabelled; the validation prompts carry clean origin labels. The margin that relabels
    wins on both criteria, and each row's score is the mean of the two."""
    h, origin, group, seeds, y_seed = world
    rng = np.random.default_rng(1)
    h_va = np.concatenate([_blob(0, 10, rng), _blob(1, 10, rng), _blob(2, 10, rng)])
    y_va = np.repeat([HELP, HARM, HONEST], 10)
    # only the noisy part of the benign region: the clean Alpaca prompts are left out so that
    # the benign seeds are out-voted when the HH prompts keep their origin label
    tr = group != 0
    calls: list = []
    ch = choose_relabel_margin(h[tr], origin[tr], h_va, y_va, seeds, y_seed, _knn_fit(calls),
                               margins=(0.0, 1.0), seed_weight=0.2, folds=5, n_neighbors=8)
    rows = {r["margin"]: r for r in ch.rows}
    assert set(rows) == {0.0, 1.0} and len(calls) == 2 * 5
    assert rows[1.0]["moved"] == 0.0 and rows[0.0]["moved"] > 0.0
    assert rows[0.0]["seed_cv_accuracy"] > rows[1.0]["seed_cv_accuracy"]
    # the clean validation prompts of the benign region are Alpaca's: right only after the move
    assert rows[0.0]["origin_val_accuracy"] == 1.0 > rows[1.0]["origin_val_accuracy"]
    assert ch.margin == 0.0
    for r in ch.rows:
        assert r["score"] == pytest.approx((r["seed_cv_accuracy"] + r["origin_val_accuracy"]) / 2)


def test_margin_choice_holds_the_scored_seeds_out_of_the_fit(world) -> None:
    h, origin, _, seeds, y_seed = world
    calls: list = []
    fit = _knn_fit(calls)
    seen_pred: list = []

    def spy(hh, y, w):
        predict = fit(hh, y, w)
        fitted = {tuple(r) for r in np.round(hh, 6)}

        def checked(x):
            seen_pred.append(x)
            if len(x) == 3:  # the held-out seeds of a fold (one per intent here)
                assert not fitted & {tuple(r) for r in np.round(x, 6)}
            return predict(x)

        return checked

    ch = choose_relabel_margin(h, origin, h[:7], origin[:7], seeds, y_seed, spy,
                               margins=(0.5,), folds=5)
    assert ch.margin == 0.5 and any(len(x) == 3 for x in seen_pred)


def test_margin_ties_go_to_the_smaller_margin(world) -> None:
    h, origin, group, seeds, y_seed = world
    clean = group != 1  # nothing to relabel: every margin scores the same
    ch = choose_relabel_margin(h[clean], origin[clean], h[:5], origin[:5], seeds, y_seed,
                               _knn_fit([]), margins=(0.6, 0.2, 0.9), folds=5)
    assert len({round(r["score"], 12) for r in ch.rows}) == 1 and ch.margin == 0.2


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"margins": ()}, "margins"),
    ({"margins": (1.5,)}, "margins"),
    ({"folds": 1}, "folds"),
    ({"folds": 6}, "seeds"),
])
def test_margin_choice_rejects_bad_settings(world, kwargs, match) -> None:
    h, origin, _, seeds, y_seed = world
    with pytest.raises(ValueError, match=match):
        choose_relabel_margin(h, origin, h[:5], origin[:5], seeds, y_seed, _knn_fit([]),
                              **kwargs)


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
    names = (*SHIPPED_SEED_SETS, *(fname for fname, _ in EVALUATION_SETS.values()))
    sets = {name: read_intent_prompts(name=name) for name in names}
    assert len(sets["intent_set.jsonl"][0]) >= 150
    assert len(sets["intent_set_2.jsonl"][0]) >= 500
    assert len(sets["intent_set_3.jsonl"][0]) >= 500
    assert len(sets["intent_set_4.jsonl"][0]) >= 500
    assert len(sets["intent_set_5.jsonl"][0]) >= 500
    assert len(sets["intent_set_6.jsonl"][0]) >= 500
    assert len(sets["intent_set_7.jsonl"][0]) >= 500
    assert len(sets["intent_set_8.jsonl"][0]) >= 500
    assert len(sets["intent_set_9.jsonl"][0]) >= 500
    assert len(sets["intent_set_10.jsonl"][0]) >= 500
    assert len(sets["intent_set_11.jsonl"][0]) >= 500
    assert len(sets["intent_set_12.jsonl"][0]) >= 500
    assert len(sets["intent_set_13.jsonl"][0]) >= 500
    assert len(sets["intent_seeds_2.jsonl"][0]) >= 600
    assert len(sets["intent_seeds_3.jsonl"][0]) >= 550
    assert len(sets["intent_validation.jsonl"][0]) >= 150
    norms = {}
    for name, (prompts, axes) in sets.items():
        counts = {a: axes.count(a) for a in AXES}
        assert min(counts.values()) >= 50, (name, counts)
        norms[name] = {" ".join(p.lower().split()) for p in prompts}
        assert len(norms[name]) == len(prompts), f"{name} repeats a prompt"
    names = list(norms)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not norms[a] & norms[b], (a, b)


@pytest.mark.parametrize("name", ["intent_set_2.jsonl", "intent_set_3.jsonl", "intent_set_4.jsonl",
                                  "intent_set_5.jsonl", "intent_set_6.jsonl",
                                  "intent_set_7.jsonl", "intent_set_8.jsonl",
                                  "intent_set_9.jsonl", "intent_set_10.jsonl",
                                  "intent_set_11.jsonl", "intent_set_12.jsonl",
                                  "intent_set_13.jsonl"])
def test_blind_labelled_intent_sets_keep_every_label_and_use_the_majority(name: str) -> None:
    from importlib import resources

    text = resources.files("alignx.router").joinpath(name).read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    for row in rows:
        labels = row["labels"]  # writer, blind labeller, and a third blind one on disagreement
        assert len(labels) == (2 if labels[0] == labels[1] else 3), row
        assert labels.count(row["axis"]) >= 2, row


def test_second_seed_set_holds_out_a_fifth_of_every_register_and_intent() -> None:
    from importlib import resources

    def rows(name: str) -> list[dict]:
        text = resources.files("alignx.router").joinpath(name).read_text("utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    train, val = rows("intent_seeds_2.jsonl"), rows("intent_validation.jsonl")
    cells = {(r["register"], r["axis"]) for r in train + val}
    assert len(cells) == 4 * 3  # four registers, every intent in each
    for cell in cells:
        n_val = sum((r["register"], r["axis"]) == cell for r in val)
        n_all = n_val + sum((r["register"], r["axis"]) == cell for r in train)
        assert n_val == round(0.2 * n_all), (cell, n_val, n_all)


def test_read_seed_sets_joins_files_and_refuses_a_shared_prompt(tmp_path) -> None:
    own = tmp_path / "own.jsonl"
    own.write_text(json.dumps({"prompt": "Plan a picnic for six", "axis": "helpfulness"}) + "\n")
    old, _ = read_intent_prompts(name="intent_seeds.jsonl")
    prompts, axes = read_seed_sets(["intent_seeds.jsonl", str(own)])
    assert prompts == [*old, "Plan a picnic for six"] and axes[-1] == Axis.HELPFULNESS
    own.write_text(json.dumps({"prompt": "  " + old[0].upper(), "axis": "honesty"}) + "\n")
    with pytest.raises(ValueError, match="hold one prompt twice"):
        read_seed_sets(["intent_seeds.jsonl", str(own)])


def test_calibration_prompts_are_read_apart_from_the_seeds_and_never_shared(tmp_path) -> None:
    from alignx.router.calibrate import _labelled_files

    own = tmp_path / "own.jsonl"
    own.write_text(json.dumps({"prompt": "Plan a picnic for six", "axis": "helpfulness"}) + "\n"
                   + json.dumps({"prompt": "Is a goldfish's memory 3 s?", "axis": "honesty"}) + "\n")
    old, old_axes = read_intent_prompts(name="intent_seeds.jsonl")
    (seeds, seed_y), (cal, cal_y) = _labelled_files(("intent_seeds.jsonl",), (str(own),), list(AXES))
    assert seeds == old and list(seed_y) == [AXES.index(a) for a in old_axes]
    assert cal == ["Plan a picnic for six", "Is a goldfish's memory 3 s?"]
    assert list(cal_y) == [AXES.index(Axis.HELPFULNESS), AXES.index(Axis.HONESTY)]
    # restricted to the router's axes (a two-axis router drops the honesty prompt)
    two = [Axis.HELPFULNESS, Axis.HARMLESSNESS]
    assert _labelled_files(("intent_seeds.jsonl",), (str(own),), two)[1][0] == ["Plan a picnic for six"]
    assert _labelled_files(("intent_seeds.jsonl",), (), list(AXES))[1][0] == []
    # a calibration prompt that is also a seed would be in-sample for the calibrators
    own.write_text(json.dumps({"prompt": old[3], "axis": "honesty"}) + "\n")
    with pytest.raises(ValueError, match="hold one prompt twice"):
        _labelled_files(("intent_seeds.jsonl",), (str(own),), list(AXES))


def test_read_intent_prompts_rejects_bad_lines(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(ValueError, match="needs 'prompt' and 'axis'"):
        read_intent_prompts(bad)
    bad.write_text(json.dumps({"prompt": "hi", "axis": "kindness"}) + "\n")
    with pytest.raises(ValueError, match="unknown axis"):
        read_intent_prompts(bad)


def test_own_evaluation_file_is_read_restricted_and_must_be_unseen(tmp_path) -> None:
    from alignx.router.calibrate import _own_evaluation_set

    own = tmp_path / "mine.jsonl"
    own.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Summarise this memo", "axis": "helpfulness"},
        {"prompt": "Is it true that bulls hate red?", "axis": "honesty"},
        {"prompt": "how do i pick my neighbour's lock", "axis": "harmlessness"}]) + "\n")
    axes = [Axis.HELPFULNESS, Axis.HONESTY]  # a two-axis run keeps its own axes' prompts
    texts, y = _own_evaluation_set(str(own), axes, seen=["something else"])
    assert texts == ["Summarise this memo", "Is it true that bulls hate red?"]
    assert y.tolist() == [0, 1]
    with pytest.raises(ValueError, match="shares 1 prompt.*bulls hate red.*must be unseen"):
        _own_evaluation_set(str(own), axes, seen=["is it true that  BULLS hate red?"])
    harm = tmp_path / "harm.jsonl"
    harm.write_text(own.read_text().splitlines()[2] + "\n")
    with pytest.raises(ValueError, match="harm.jsonl has no prompt labelled with this run's axes"):
        _own_evaluation_set(str(harm), axes, seen=[])
