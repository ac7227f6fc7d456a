"""`alignx pipeline` end to end on the tiny config, and its stage-by-stage resume."""

from __future__ import annotations

import pytest

from alignx.artifacts import MULTITASK, ArtifactLayout, read_json
from alignx.axes import AXES

pytestmark = pytest.mark.slow


def test_pipeline_produces_every_stage_artifact(tiny_run):
    layout = ArtifactLayout(tiny_run.run_dir)
    assert layout.config_path.is_file()
    for axis in AXES:
        assert layout.load_data_manifest(axis).splits["train"].count > 0
        m = layout.load_adapter_manifest(axis)
        assert m.base_model == "tiny-llama" and m.steps == 4 and m.eval_loss
        assert (layout.adapter_dir(axis) / "adapter_model.safetensors").is_file()
    mt = layout.load_adapter_manifest(MULTITASK)
    assert mt.steps == 12 and set(mt.axes) == set(AXES)  # same total budget as the 3 experts
    report = read_json(layout.stage1_report)
    for cond in ("injected", "plain"):
        assert set(report["answer_loss"][cond]) == {a.value for a in AXES}
        assert {"base", MULTITASK, *[a.value for a in AXES]} <= set(
            report["answer_loss"][cond]["honesty"])
    cos = report["task_vector_cosine"]
    assert len(cos["matrix"]) == 4 and all(abs(cos["matrix"][i][i] - 1) < 1e-3 for i in range(4))


def test_rerun_skips_finished_stages(tiny_run, monkeypatch):
    import alignx.train.trainer as trainer
    from alignx.pipeline import run_train

    layout = ArtifactLayout(tiny_run.run_dir)
    before = {a: layout.load_adapter_manifest(a).created_at for a in [*AXES, MULTITASK]}

    def boom(*a, **k):
        raise AssertionError("a finished adapter was retrained")

    monkeypatch.setattr(trainer, "train_all", boom)
    out = run_train(tiny_run, list(AXES), multitask=True)
    assert set(out) == {*[a.value for a in AXES], MULTITASK}
    assert {a: layout.load_adapter_manifest(a).created_at for a in before} == before
