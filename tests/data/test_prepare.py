"""prepare_axis: Parquet splits + manifest, deterministic, resumable, capped, leak-checked."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from alignx.artifacts import ArtifactLayout, ArtifactNotFoundError, sha256_file
from alignx.axes import AXES, Axis
from alignx.config import AlignXConfig
from alignx.data.prepare import COLUMNS, DataLeakError, load_split, prepare_all, prepare_axis
from alignx.data.sources import DataFormatError
from alignx.data.templates import default_template


def _cfg(run_dir, data_dir, **data) -> AlignXConfig:
    return AlignXConfig.model_validate(
        {"run_dir": str(run_dir), "data": {"data_dir": str(data_dir), **data}}
    )


def test_prepare_axis_writes_parquet_and_manifest(tmp_path, data_dir):
    cfg = _cfg(tmp_path / "run", data_dir)
    m = prepare_axis(cfg, Axis.HONESTY)
    layout = ArtifactLayout(cfg.run_dir)
    assert layout.data_manifest(Axis.HONESTY).is_file()
    assert m.axis is Axis.HONESTY and m.source == "truthfulqa"
    assert {s: i.count for s, i in m.splits.items()} == {"train": 6, "validation": 2, "test": 2}
    assert m.source_files["test"].endswith("truthfulqa/test.jsonl")
    t = default_template(Axis.HONESTY)
    assert (m.template_id, m.template_system) == (t.id, t.system)
    assert m.config_hash == cfg.config_hash()
    for split, info in m.splits.items():
        path = layout.data_split(Axis.HONESTY, split)
        assert info.path == path.name and info.sha256 == sha256_file(path)
        table = pq.read_table(path)
        assert tuple(table.column_names) == COLUMNS and table.num_rows == info.count
    # the manifest on disk is the one returned
    assert layout.load_data_manifest(Axis.HONESTY).data_hash == m.data_hash


def test_load_split_decodes_rows(tmp_path, data_dir):
    cfg = _cfg(tmp_path / "run", data_dir)
    prepare_axis(cfg, Axis.HARMLESSNESS)  # default source: hh_rlhf
    rows = load_split(cfg.run_dir, Axis.HARMLESSNESS, "train")
    assert len(rows) == 5 and set(rows[0]) == set(COLUMNS)
    t = default_template(Axis.HARMLESSNESS)
    for r in rows:
        assert r["axis"] == "harmlessness" and r["source"] == "hh_rlhf" and r["template_id"] == t.id
        assert r["messages"][-1]["role"] == "user"
        assert r["injected"] == [{"role": "system", "content": t.system}, *r["messages"]]
        assert isinstance(r["meta"], dict) and "rejected_response" in r["meta"]
    with pytest.raises(ValueError, match="unknown split"):
        load_split(cfg.run_dir, Axis.HARMLESSNESS, "dev")
    with pytest.raises(ArtifactNotFoundError, match="alignx prepare"):
        load_split(cfg.run_dir, Axis.HELPFULNESS, "train")


def test_prepare_is_deterministic_and_resumable(tmp_path, data_dir):
    a = prepare_axis(_cfg(tmp_path / "a", data_dir), Axis.HELPFULNESS)
    b = prepare_axis(_cfg(tmp_path / "b", data_dir), Axis.HELPFULNESS)
    assert a.data_hash == b.data_hash
    assert {s: i.sha256 for s, i in a.splits.items()} == {s: i.sha256 for s, i in b.splits.items()}
    # a second run in the same directory writes nothing
    layout = ArtifactLayout(tmp_path / "a")
    mtimes = {p: p.stat().st_mtime_ns for p in layout.data_dir(Axis.HELPFULNESS).iterdir()}
    again = prepare_axis(_cfg(tmp_path / "a", data_dir), Axis.HELPFULNESS)
    assert again == a
    assert {p: p.stat().st_mtime_ns for p in layout.data_dir(Axis.HELPFULNESS).iterdir()} == mtimes
    # a damaged split file is noticed and rewritten
    layout.data_split(Axis.HELPFULNESS, "test").write_bytes(b"garbage")
    fixed = prepare_axis(_cfg(tmp_path / "a", data_dir), Axis.HELPFULNESS)
    assert fixed.data_hash == a.data_hash
    assert sha256_file(layout.data_split(Axis.HELPFULNESS, "test")) == a.splits["test"].sha256


def test_changed_input_changes_the_hash(tmp_path, data_dir):
    base = prepare_axis(_cfg(tmp_path / "a", data_dir), Axis.HELPFULNESS)
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    path = copy / "alpaca" / "test.jsonl"
    path.write_text(path.read_text().replace("Bonjour", "Bonjour !"))
    changed = prepare_axis(_cfg(tmp_path / "a", copy), Axis.HELPFULNESS)
    assert changed.data_hash != base.data_hash
    rows = load_split(tmp_path / "a", Axis.HELPFULNESS, "test")
    assert "Bonjour !" in [r["response"] for r in rows]


def test_no_injection_keeps_the_raw_conversation(tmp_path, data_dir):
    m = prepare_axis(_cfg(tmp_path / "run", data_dir, inject=False), Axis.HELPFULNESS)
    assert m.template_id == "none" and m.template_system == ""
    rows = load_split(tmp_path / "run", Axis.HELPFULNESS, "train")
    assert all(r["injected"] == r["messages"] and r["template_id"] == "none" for r in rows)
    injected = prepare_axis(_cfg(tmp_path / "inj", data_dir), Axis.HELPFULNESS)
    assert injected.data_hash != m.data_hash


def test_caps_subsample_deterministically(tmp_path, data_dir):
    cfg = _cfg(tmp_path / "a", data_dir, max_train_per_axis=3, max_eval_per_axis=1, seed=1)
    m = prepare_axis(cfg, Axis.HONESTY)
    assert {s: i.count for s, i in m.splits.items()} == {"train": 3, "validation": 1, "test": 1}
    again = prepare_axis(
        _cfg(tmp_path / "b", data_dir, max_train_per_axis=3, max_eval_per_axis=1, seed=1),
        Axis.HONESTY,
    )
    assert again.data_hash == m.data_hash
    uids = [r["uid"] for r in load_split(tmp_path / "a", Axis.HONESTY, "train")]
    # kept rows stay in source order; a smaller cap keeps a subset
    assert uids == sorted(uids, key=lambda u: int(u.split(":")[1]))
    prepare_axis(_cfg(tmp_path / "c", data_dir, max_train_per_axis=2, seed=1), Axis.HONESTY)
    assert set(r["uid"] for r in load_split(tmp_path / "c", Axis.HONESTY, "train")) < set(uids)
    # another seed picks another subset
    other = [
        prepare_axis(_cfg(tmp_path / f"s{s}", data_dir, max_train_per_axis=3, seed=s), Axis.HONESTY)
        for s in (2, 3, 4)
    ]
    assert len({o.data_hash for o in other} | {m.data_hash}) > 1


def test_truthfulqa_test_question_in_train_is_an_error(tmp_path, data_dir):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    test_row = (copy / "truthfulqa" / "test.jsonl").read_text().splitlines()[0]
    leaked = json.loads(test_row) | {"idx": 99}
    with open(copy / "truthfulqa" / "train.jsonl", "a") as f:
        f.write(json.dumps(leaked) + "\n")
    with pytest.raises(DataLeakError, match="never be trained on") as ei:
        prepare_axis(_cfg(tmp_path / "run", copy), Axis.HONESTY)
    assert isinstance(ei.value, DataFormatError) and "truthfulqa/train.jsonl" in str(ei.value)
    assert not ArtifactLayout(tmp_path / "run").data_manifest(Axis.HONESTY).exists()


def test_other_axes_drop_leaked_rows_from_train(tmp_path, data_dir):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    test_row = (copy / "alpaca" / "test.jsonl").read_text().splitlines()[0]
    with open(copy / "alpaca" / "train.jsonl", "a") as f:
        f.write(json.dumps(json.loads(test_row) | {"idx": 999}) + "\n")
    m = prepare_axis(_cfg(tmp_path / "run", copy), Axis.HELPFULNESS)
    assert m.splits["train"].count == 5  # the copied test row is not in train
    assert "alpaca:999" not in {
        r["uid"] for r in load_split(tmp_path / "run", Axis.HELPFULNESS, "train")
    }


def test_prepare_all_with_beavertails(tmp_path, data_dir):
    cfg = _cfg(
        tmp_path / "run",
        data_dir,
        sources={"helpfulness": "alpaca", "harmlessness": "beavertails", "honesty": "truthfulqa"},
    )
    out = prepare_all(cfg)
    assert list(out) == list(AXES)
    assert out[Axis.HARMLESSNESS].source == "beavertails"
    assert out[Axis.HARMLESSNESS].splits["train"].count == 4  # safe responses only
    assert len({m.data_hash for m in out.values()}) == 3


def test_missing_data_dir_names_the_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("ALIGNX_DATA_DIR", raising=False)
    cfg = AlignXConfig.model_validate({"run_dir": str(tmp_path / "run")})
    with pytest.raises(ValueError, match=r"data\.data_dir.*ALIGNX_DATA_DIR"):
        prepare_axis(cfg, Axis.HELPFULNESS)
