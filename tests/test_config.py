from __future__ import annotations

import pytest

from alignx.axes import Axis, parse_axis
from alignx.config import AlignXConfig, AlignXConfigError, apply_overrides, load_config


def test_defaults_validate_and_hash_is_stable():
    a, b = AlignXConfig(), AlignXConfig()
    assert a.config_hash() == b.config_hash()
    assert a.axes == [Axis.HELPFULNESS, Axis.HARMLESSNESS, Axis.HONESTY]


def test_overrides_are_typed(tmp_path):
    cfg = load_config(None, ["train.lora.rank=32", "train.optim.lr=1e-3", "data.inject=false",
                             "axes=[honesty]", "router.fallback=honesty"],
                      run_dir=str(tmp_path / "r"))
    assert cfg.train.lora.rank == 32
    assert cfg.train.optim.lr == pytest.approx(1e-3)
    assert cfg.data.inject is False
    assert cfg.axes == [Axis.HONESTY]
    assert cfg.run_dir == str((tmp_path / "r").resolve())


def test_all_problems_reported_together_with_key_names(tmp_path):
    with pytest.raises(AlignXConfigError) as ei:
        load_config(None, ["train.lora.rnak=4", "train.optim.lr=-1", "model.dtype=fp8"])
    msg = str(ei.value)
    assert "3 problem(s)" in msg
    assert "train.lora.rnak: unknown key" in msg
    assert "train.optim.lr" in msg and "greater than 0" in msg
    assert "model.dtype" in msg


def test_cross_field_rules_name_the_key():
    with pytest.raises(AlignXConfigError, match=r"data.sources.honesty='alpaca'"):
        load_config(None, ["data.sources.honesty=alpaca"])
    with pytest.raises(AlignXConfigError, match="router.fallback='harmlessness' is not one of axes"):
        load_config(None, ["axes=[honesty,helpfulness]"])
    with pytest.raises(AlignXConfigError, match="sum to 1"):
        load_config(None, ["router.calibration_weights=[0.7,0.7]"])
    with pytest.raises(AlignXConfigError, match="duplicates"):
        load_config(None, ["axes=[honesty,honesty]"])
    with pytest.raises(AlignXConfigError, match=r"router.relabel_margin must be in \[0, 1\]"):
        load_config(None, ["router.relabel_margin=1.5"])
    assert load_config(None, ["router.relabel_margin=0.3"]).router.relabel_margin == 0.3
    assert load_config(None).router.relabel_margin == "auto"


def test_router_seed_sets_are_checked_at_the_edge(tmp_path):
    cfg = load_config(None, ["router.seed_sets=[intent_seeds.jsonl,intent_seeds_2.jsonl]"])
    assert cfg.router.seed_sets == ("intent_seeds.jsonl", "intent_seeds_2.jsonl")
    own = tmp_path / "mine.jsonl"
    own.write_text('{"prompt": "hi", "axis": "helpfulness"}\n')
    assert load_config(None, [f"router.seed_sets=[{own}]"]).router.seed_sets == (str(own),)
    # an evaluation set is never training data, whatever the path it is named by
    for name in ("intent_validation.jsonl", "intent_set_9.jsonl", "intent_set_10.jsonl",
                 "intent_set_11.jsonl", "intent_set_12.jsonl", "intent_set_13.jsonl",
                 "some/dir/intent_set.jsonl"):
        for key in ("seed_sets", "calibration_sets"):
            with pytest.raises(AlignXConfigError, match=f"router.{key}.*is an evaluation set"):
                load_config(None, [f"router.{key}=[{name}]"])
    # the retired frozen sets are shipped training / calibration data
    r = load_config(None, ["router.seed_sets=[intent_seeds.jsonl,intent_set_2.jsonl]",
                           "router.calibration_sets=[intent_set_3.jsonl]"]).router
    assert r.seed_sets == ("intent_seeds.jsonl", "intent_set_2.jsonl")
    assert r.calibration_sets == ("intent_set_3.jsonl",)
    with pytest.raises(AlignXConfigError, match="neither a shipped hand-labelled file"):
        load_config(None, [f"router.seed_sets=[{tmp_path / 'nope.jsonl'}]"])
    with pytest.raises(AlignXConfigError, match="router.calibration_sets.*neither a shipped"):
        load_config(None, [f"router.calibration_sets=[{tmp_path / 'nope.jsonl'}]"])
    # a calibration prompt must be one the router never trained on
    with pytest.raises(AlignXConfigError, match="calibration_sets names .*intent_set_2.jsonl.*"
                       "seed_sets already trains on"):
        load_config(None, ["router.seed_sets=[intent_seeds.jsonl,intent_set_2.jsonl]",
                           "router.calibration_sets=[intent_set_2.jsonl]"])
    with pytest.raises(AlignXConfigError, match="router.calibration_sets.*named twice"):
        load_config(None, ["router.calibration_sets=[intent_set_3.jsonl,intent_set_3.jsonl]"])
    # the defaults: the boundary seeds and the second and fifth to eighth sets train, the
    # third set calibrates; [] = validation split only
    d = load_config(None).router
    assert d.seed_sets == ("intent_seeds.jsonl", "intent_seeds_2.jsonl", "intent_set_2.jsonl",
                           "intent_seeds_3.jsonl", "intent_set_5.jsonl", "intent_set_6.jsonl",
                           "intent_set_7.jsonl", "intent_set_8.jsonl")
    assert d.calibration_sets == ("intent_set_3.jsonl",)
    assert load_config(None, ["router.calibration_sets=[]"]).router.calibration_sets == ()
    with pytest.raises(AlignXConfigError, match="router.seed_sets.*empty"):
        load_config(None, ["router.seed_sets=[]"])
    with pytest.raises(AlignXConfigError, match="router.seed_sets.*named twice"):
        load_config(None, ["router.seed_sets=[intent_seeds.jsonl,intent_seeds.jsonl]"])
    # the seeds are part of what the calibration stage is made from
    a = load_config(None, ["router.seed_sets=[intent_seeds.jsonl]"])
    assert a.stage_hash("calibrate") != cfg.stage_hash("calibrate")
    b = load_config(None, ["router.calibration_sets=[]"])
    assert b.stage_hash("calibrate") != load_config(None).stage_hash("calibrate")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(AlignXConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(AlignXConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(AlignXConfigError, match="mapping"):
        load_config(lst)


def test_override_syntax_errors():
    with pytest.raises(AlignXConfigError, match="key.sub=value"):
        apply_overrides({}, ["train.lora.rank"])
    with pytest.raises(AlignXConfigError, match="not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_stage_hash_ignores_unrelated_sections():
    a = load_config(None, ["data.max_train_per_axis=10"])
    b = load_config(None, ["data.max_train_per_axis=10", "train.optim.lr=0.5"])
    assert a.stage_hash("prepare") == b.stage_hash("prepare")
    assert a.stage_hash("train") != b.stage_hash("train")


def test_skipping_the_multitask_baseline_keeps_the_experts_stage_hashes():
    a = load_config(None, ["eval.systems=[alignx,base]"])
    b = load_config(None, ["eval.systems=[alignx,base]", "train.multitask=false"])
    assert a.train.multitask and not b.train.multitask
    for stage in ("train", "calibrate", "evaluate"):
        assert a.stage_hash(stage) == b.stage_hash(stage), stage
    with pytest.raises(AlignXConfigError, match="train.multitask=true or drop multitask"):
        load_config(None, ["train.multitask=false"])  # the default eval.systems has multitask


def test_config_roundtrips_through_worker_dict():
    cfg = load_config(None, ["train.deepspeed.zero_stage=3"])
    again = AlignXConfig.model_validate(cfg.model_dump(mode="json"))
    assert again == cfg


def test_parse_axis():
    assert parse_axis("Honesty") is Axis.HONESTY
    assert f"expert-{Axis.HONESTY}" == "expert-honesty"
    with pytest.raises(ValueError, match="valid axes"):
        parse_axis("safety")


def test_a_run_config_older_than_a_key_says_which_default_filled_it(tmp_path, caplog):
    import logging

    import yaml

    tree = yaml.safe_load(load_config(None).to_yaml())  # what every run directory holds
    del tree["router"]["calibration_sets"], tree["router"]["pool_temperature"]
    old = tmp_path / "config.yaml"
    old.write_text(yaml.safe_dump(tree))
    with caplog.at_level(logging.WARNING, logger="alignx.config"):
        cfg = load_config(old)
    assert cfg.router.calibration_sets == ("intent_set_3.jsonl",)  # today's default, but ...
    text = caplog.text
    assert "router.calibration_sets=[\"intent_set_3.jsonl\"]" in text
    assert 'router.pool_temperature="shared"' in text and "pass it as an override" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="alignx.config"):
        load_config(old, ["router.calibration_sets=[]"])  # an override pins the value ...
        (tmp_path / "mine.yaml").write_text("router: {epsilon: 0.1}\n")
        load_config(tmp_path / "mine.yaml")  # ... and a hand-written config is never "older"
    assert "calibration_sets" not in caplog.text
    assert "before this key existed; today's default fills it in (router.pool_temperature" in (
        caplog.text)
    assert "mine.yaml" not in caplog.text
    # a section-valued default is shown as the YAML / JSON a user would write
    del tree["router"]["finetune_anchor"]
    old.write_text(yaml.safe_dump(tree))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="alignx.config"):
        load_config(old)
    assert ('router.finetune_anchor={"seed_sets": ["intent_seeds.jsonl", "intent_seeds_2.jsonl", '
            '"intent_set_2.jsonl", "intent_seeds_3.jsonl"], "weight": 0.625}') in caplog.text


def test_router_evaluation_sets_are_checked_at_the_edge(tmp_path):
    from alignx.router.targets import EVALUATION_SETS

    d = load_config(None)
    assert d.router.evaluation_sets is None  # unset: every shipped set is reported
    assert all(d.router.reports(fname) for fname, _ in EVALUATION_SETS.values())
    one = load_config(None, ["router.evaluation_sets=[intent_set_11.jsonl]"])
    assert one.router.reports("intent_set_11.jsonl") and not one.router.reports("intent_set.jsonl")
    assert not load_config(None, ["router.evaluation_sets=[]"]).router.reports("intent_set.jsonl")
    # a report-only choice, but the report is part of the stage's output: a new list redoes
    # it; the default keeps the hash a router had before the key existed
    assert one.stage_hash("calibrate") != d.stage_hash("calibrate")
    assert d.stage_hash("calibrate") == _hash_without_evaluation_sets(d)
    with pytest.raises(AlignXConfigError, match="router.evaluation_sets.*'intent_seeds.jsonl' "
                       "is neither a shipped evaluation set nor an existing file; choose among "
                       "intent_validation.jsonl"):
        load_config(None, ["router.evaluation_sets=[intent_seeds.jsonl]"])
    with pytest.raises(AlignXConfigError, match=r"\['a.jsonl', 'b.jsonl'\] are neither shipped"):
        load_config(None, ["router.evaluation_sets=[a.jsonl,intent_set.jsonl,b.jsonl]"])
    # your own labelled file, reported under its stem, next to a shipped set
    own = tmp_path / "my_traffic.jsonl"
    own.write_text('{"prompt": "hi", "axis": "helpfulness"}\n')
    r = load_config(None, [f"router.evaluation_sets=[intent_set.jsonl,{own}]"]).router
    assert r.own_evaluation_sets() == (str(own),) and r.reports("intent_set.jsonl")
    shadow = tmp_path / "intent_set_9.jsonl"  # not the shipped file, but its report key
    shadow.write_text(own.read_text())
    with pytest.raises(AlignXConfigError, match="reported under a shipped set's key; rename"):
        load_config(None, [f"router.evaluation_sets=[{shadow}]"])
    (tmp_path / "b").mkdir()
    twin = tmp_path / "b" / "my_traffic.jsonl"
    twin.write_text(own.read_text())
    with pytest.raises(AlignXConfigError, match=r"reported as \['my_traffic'\].*distinct names"):
        load_config(None, [f"router.evaluation_sets=[{own},{twin}]"])
    with pytest.raises(AlignXConfigError, match="evaluation_sets names .*my_traffic.jsonl.*"
                       "also uses: an evaluation set must be unseen"):
        load_config(None, [f"router.evaluation_sets=[{own}]", f"router.calibration_sets=[{own}]"])
    with pytest.raises(AlignXConfigError, match=r"reported as \['intent_set'\]"):
        load_config(None, ["router.evaluation_sets=[intent_set.jsonl,intent_set.jsonl]"])


def test_retired_sets_are_evaluated_only_by_a_router_not_trained_on_them():
    from alignx.router.targets import EVALUATION_SETS

    # sets 5-8 are default seed files now: the default router cannot report them
    with pytest.raises(AlignXConfigError, match=r"evaluation_sets names \['intent_set_5.jsonl'\], "
                       "which router.seed_sets or router.calibration_sets also uses"):
        load_config(None, ["router.evaluation_sets=[intent_set_5.jsonl]"])
    # a router trained without them may (as every router before the switch did), and a
    # config saved then, the earlier default seeds and no anchor key, still loads as it was
    old = {"seed_sets": ["intent_seeds.jsonl", "intent_seeds_2.jsonl", "intent_set_2.jsonl",
                         "intent_seeds_3.jsonl"],
           "evaluation_sets": ["intent_set.jsonl", "intent_set_5.jsonl", "intent_set_8.jsonl"]}
    r = AlignXConfig.model_validate({"router": old}).router
    assert r.finetune_anchor is None  # the anchor's own seeds: no second, equal fine-tune
    assert r.shipped_evaluation_sets() == {"intent_set": "intent_set.jsonl",
                                           "intent_set_5": "intent_set_5.jsonl",
                                           "intent_set_8": "intent_set_8.jsonl"}
    assert r.own_evaluation_sets() == ()
    # unset: every evaluation set, no retired one
    d = load_config(None).router
    assert d.shipped_evaluation_sets() == {k: f for k, (f, _) in EVALUATION_SETS.items()}
    # nor may the anchor have trained on it
    with pytest.raises(AlignXConfigError, match="finetune_anchor.seed_sets trains on"):
        load_config(None, ["router.seed_sets=[intent_seeds.jsonl]",
                           "router.finetune_anchor={seed_sets: [intent_set_6.jsonl], weight: 0.5}",
                           "router.evaluation_sets=[intent_set_6.jsonl]"])


def test_router_miss_cost_is_checked_at_the_edge_and_unset_keeps_the_hash():
    d = load_config(None, [])
    assert d.router.miss_cost == {} and d.stage_hash("calibrate") == _hash_without_evaluation_sets(d)
    c = load_config(None, ["router.policy=cost", "router.miss_cost={harmlessness: 3}"])
    assert c.router.miss_cost == {Axis.HARMLESSNESS: 3.0}
    assert c.stage_hash("calibrate") != d.stage_hash("calibrate")
    with pytest.raises(AlignXConfigError, match=r"router.miss_cost.*finite numbers > 0"):
        load_config(None, ["router.miss_cost={harmlessness: 0}"])
    with pytest.raises(AlignXConfigError, match=r"router.miss_cost.kindness"):
        load_config(None, ["router.miss_cost={kindness: 2}"])
    with pytest.raises(AlignXConfigError, match=r"router.miss_cost names \['harmlessness'\], not "
                       "among axes"):
        load_config(None, ["axes=[helpfulness,honesty]", "router.fallback=honesty",
                           "router.miss_cost={harmlessness: 2}"])


def test_router_finetune_anchor_default_and_edge_checks():
    # the default (W38): the earlier default's four seed files at 0.625, where it applies
    d = load_config(None).router.finetune_anchor
    assert d.seed_sets == ("intent_seeds.jsonl", "intent_seeds_2.jsonl", "intent_set_2.jsonl",
                           "intent_seeds_3.jsonl") and d.weight == 0.625
    for no_anchor in ("router.encoder=base", "router.finetune_epochs=0", "router.targets=origin",
                      "router.finetune_members=3", "router.finetune_anchor=null"):
        assert load_config(None, [no_anchor]).router.finetune_anchor is None, no_anchor
    # the resolved config (as saved with a run) reads back to the same anchor and hash
    c = load_config(None)
    again = AlignXConfig.model_validate(c.model_dump(mode="json"))
    assert again.router.finetune_anchor == d
    assert again.stage_hash("calibrate") == c.stage_hash("calibrate")
    # an explicit anchor is kept and is part of the stage hash
    anchor = "router.finetune_anchor={seed_sets: [intent_seeds.jsonl], weight: 0.625}"
    c = load_config(None, [anchor])
    assert c.router.finetune_anchor.seed_sets == ("intent_seeds.jsonl",)
    assert c.stage_hash("calibrate") != load_config(None, []).stage_hash("calibrate")
    assert load_config(None, ["router.finetune_anchor=null"]).stage_hash("calibrate") != \
        load_config(None, []).stage_hash("calibrate")
    for bad, match in [
        ("router.finetune_anchor={seed_sets: [intent_seeds.jsonl], weight: 1}", "less than 1"),
        ("router.finetune_anchor={seed_sets: [], weight: 0.5}", "at least one seed file"),
        ("router.finetune_anchor={seed_sets: [intent_set_9.jsonl], weight: 0.5}",
         "is an evaluation set"),
        ("router.finetune_anchor={seed_sets: [intent_set_3.jsonl], weight: 0.5}",
         "router.calibration_sets uses"),
        ("router.finetune_anchor={seeds: [intent_seeds.jsonl], weight: 0.5}", "seeds"),
    ]:
        with pytest.raises(AlignXConfigError, match=match):
            load_config(None, [bad])
    for other, match in [("router.finetune_epochs=0", "router.finetune_epochs > 0"),
                         ("router.targets=origin", "router.targets=intent"),
                         ("router.finetune_members=2", "cannot be combined")]:
        with pytest.raises(AlignXConfigError, match=match):
            load_config(None, [anchor, other])


def _hash_without_evaluation_sets(cfg):
    """``stage_hash('calibrate')`` as it was before ``router.evaluation_sets``,
    ``router.miss_cost`` and ``router.finetune_anchor`` existed (an anchor, the default
    since then, stays in the hash)."""
    import hashlib
    import json

    from alignx.config import _STAGE_SECTIONS

    d = cfg.model_dump(mode="json")
    d["train"].pop("multitask", None)
    d["router"].pop("evaluation_sets")
    d["router"].pop("miss_cost")
    if d["router"]["finetune_anchor"] is None:  # before the key existed: no anchor
        d["router"].pop("finetune_anchor")
    keep = {k: d.get(k) for k in _STAGE_SECTIONS["calibrate"]}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]
