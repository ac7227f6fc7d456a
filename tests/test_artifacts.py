from __future__ import annotations

import json

import pytest

from alignx.artifacts import (
    AdapterManifest,
    ArtifactLayout,
    ArtifactMismatchError,
    ArtifactNotFoundError,
    check_same_base,
    read_json,
    read_manifest,
    read_parquet,
    write_json_atomic,
    write_parquet_atomic,
)
from alignx.axes import Axis


def _manifest(**kw):
    base = dict(name="honesty", axes=[Axis.HONESTY], base_model="tiny-llama",
                template_ids={"honesty": "honesty/v1"}, data_hash="d", lora={"r": 4},
                zero_stage=2, num_workers=1, steps=3, train_tokens=100, train_loss=1.0,
                eval_loss={"honesty": 2.0}, tokens_per_s=10.0, train_seconds=1.0, config_hash="c")
    base.update(kw)
    return AdapterManifest(**base)


def test_manifest_roundtrip_and_layout(tmp_path):
    layout = ArtifactLayout(tmp_path)
    write_json_atomic(layout.adapter_manifest(Axis.HONESTY), _manifest())
    m = layout.load_adapter_manifest(Axis.HONESTY)
    assert m.eval_loss == {"honesty": 2.0} and m.axes == [Axis.HONESTY]
    assert layout.adapter_dir("multitask") == tmp_path.resolve() / "adapters" / "multitask"
    assert not list(layout.adapter_dir(Axis.HONESTY).glob(".*"))  # no temp files left behind


def test_missing_and_corrupt_artifacts_are_named(tmp_path):
    layout = ArtifactLayout(tmp_path)
    with pytest.raises(ArtifactNotFoundError, match="alignx train"):
        layout.load_adapter_manifest(Axis.HONESTY)
    with pytest.raises(ArtifactNotFoundError, match="alignx prepare"):
        layout.load_data_manifest(Axis.HONESTY)
    p = layout.adapter_manifest(Axis.HONESTY)
    p.parent.mkdir(parents=True)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_json(p)
    p.write_text(json.dumps({"name": "honesty"}))
    with pytest.raises(ValueError, match="not a valid AdapterManifest"):
        read_manifest(p, AdapterManifest)


def test_base_model_mismatch_names_both():
    check_same_base("tiny-llama", "tiny-llama", "adapter")
    with pytest.raises(ArtifactMismatchError, match="'tiny-gemma'.*'tiny-llama'"):
        check_same_base("tiny-llama", "tiny-gemma", "adapter honesty")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "x.json"
    write_json_atomic(p, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(p, {"a": object()})
    assert read_json(p) == {"a": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]


def test_parquet_roundtrip(tmp_path):
    rows = [{"uid": "a", "n": 1}, {"uid": "b", "n": 2}]
    write_parquet_atomic(tmp_path / "t.parquet", rows)
    assert read_parquet(tmp_path / "t.parquet") == rows


def test_artifacts_are_world_readable(tmp_path):
    p = write_json_atomic(tmp_path / "m.json", {"a": 1})
    q = write_parquet_atomic(tmp_path / "t.parquet", [{"a": 1}])
    assert p.stat().st_mode & 0o777 == 0o644 and q.stat().st_mode & 0o777 == 0o644
