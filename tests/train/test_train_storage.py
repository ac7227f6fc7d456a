"""Ray Train with ``storage`` on S3 (moto's server on loopback, a real S3 HTTP API).

Node A prepares and publishes the data; node B (an empty run_dir of the same run) trains one
tiny axis: its data comes from S3, Ray Train writes every checkpoint to S3 (nothing under the
local run_dir), and the adapter is published there, manifest last. Node C (empty again) then
skips the finished adapter in the pipeline, fetching it, and a Ray Train restore from the S3
checkpoints continues the finished run rather than starting over.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignx.artifacts import ArtifactLayout
from alignx.axes import AXES, Axis
from alignx.storage import publish, run_location, run_storage

from ._tiny_run import tiny_config

pytestmark = pytest.mark.slow

AXIS = Axis.HONESTY


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_train_one_axis_with_checkpoints_and_adapter_on_s3(
    ray_local, ds_cpu_ops, s3_server, run_dir: Path, tmp_path_factory, monkeypatch
) -> None:
    import alignx.train.trainer as trainer
    from alignx.pipeline import run_train
    from alignx.train.trainer import fit_adapter, run_name, train_axis

    uri = s3_server.uri(f"train/{run_dir.parent.name}")
    node = {k: tmp_path_factory.mktemp(f"node-{k}") / run_dir.name for k in "bc"}
    cfg_a = tiny_config(run_dir).model_copy(update={"storage": uri})
    cfg_b, cfg_c = (tiny_config(node[k]).model_copy(update={"storage": uri}) for k in "bc")
    layout_a, layout_b, layout_c = (ArtifactLayout(c.run_dir) for c in (cfg_a, cfg_b, cfg_c))
    publish(cfg_a, *(layout_a.data_dir(a) for a in AXES))  # what `alignx prepare` does
    s3 = s3_server.filesystem()
    remote = f"{s3_server.bucket}/train/{run_dir.parent.name}/{run_dir.name}"
    assert run_location(cfg_b).startswith(f"s3://{remote}?")

    m = train_axis(cfg_b, AXIS)

    assert m.steps == 4 and m.ray_run.startswith(f"{remote}/ray_train/")
    assert _files(layout_b.data_dir(AXIS)) == _files(layout_a.data_dir(AXIS))  # fetched from S3
    assert not layout_b.ray_train_dir.exists()  # checkpoints live on the storage only
    from pyarrow.fs import FileSelector, FileType

    run_root = f"{remote}/ray_train/{run_name(cfg_b, AXIS.value)}"
    listing = s3.get_file_info(FileSelector(run_root, recursive=True))
    ckpts = sorted(i.base_name for i in listing if i.type == FileType.Directory
                   and i.base_name.startswith("checkpoint_"))
    assert len(ckpts) == 2  # checkpoint_every=2 over 4 steps, CheckpointConfig(num_to_keep=2)
    last = f"{run_root}/{ckpts[-1]}"
    with s3.open_input_stream(f"{last}/train_state.json") as f:
        assert json.loads(f.read())["global_step"] == 4
    assert s3.get_file_info(f"{last}/adapter/adapter_model.safetensors").type == FileType.File

    # the adapter on S3 is the one node B published, manifest included
    st = run_storage(cfg_b)
    ad = f"adapters/{AXIS.value}"
    local_files = _files(layout_b.adapter_dir(AXIS))
    assert sorted(st._list(ad)) == sorted(local_files)
    for name, data in local_files.items():
        assert st.read_bytes(f"{ad}/{name}") == data, name

    # node C: the pipeline's train stage finds the finished adapter on S3 and does not retrain
    def no_training(*a, **k):
        raise AssertionError("a finished adapter on shared storage was retrained")

    monkeypatch.setattr(trainer, "train_all", no_training)
    out = run_train(cfg_c, [AXIS])
    assert out[AXIS.value].created_at == m.created_at
    assert _files(layout_c.adapter_dir(AXIS)) == local_files
    monkeypatch.undo()

    # ...and Ray Train on node C restores the run from the S3 checkpoint: no step is redone
    again = fit_adapter(cfg_c, AXIS.value, [AXIS])
    assert again.steps == 4
    state = json.loads((layout_c.adapter_dir(AXIS) / "train_state.json").read_text())
    first = json.loads(local_files["train_state.json"])
    assert state["history"] == first["history"]  # the same 4 steps, none trained again
    assert state["attempts"][-1]["from_step"] == 4 and len(state["attempts"]) == 2
