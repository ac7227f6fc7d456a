"""`alignx pipeline` end to end on the tiny config, and its stage-by-stage resume."""

from __future__ import annotations

import pytest

from alignx.artifacts import MULTITASK, ArtifactLayout, read_json
from alignx.axes import AXES

pytestmark = pytest.mark.slow


def test_pipeline_produces_every_stage_artifact(tiny_run):
    layout = ArtifactLayout(tiny_run.run_dir)
    assert layout.config_path.is_file()
    expert_steps = 0
    for axis in AXES:
        assert layout.load_data_manifest(axis).splits["train"].count > 0
        m = layout.load_adapter_manifest(axis)
        assert m.base_model == "tiny-llama" and 1 <= m.steps <= 4 and m.eval_loss
        assert (layout.adapter_dir(axis) / "adapter_model.safetensors").is_file()
        assert (layout.adapter_dir(axis) / "config.yaml").is_file()
        expert_steps += m.steps
    mt = layout.load_adapter_manifest(MULTITASK)
    assert mt.steps == expert_steps and set(mt.axes) == set(AXES)  # the experts' total budget
    report = read_json(layout.stage1_report)
    for cond in ("injected", "plain"):
        assert set(report["answer_loss"][cond]) == {a.value for a in AXES}
        assert {"base", MULTITASK, *[a.value for a in AXES]} <= set(
            report["answer_loss"][cond]["honesty"])
    assert (layout.root / "router" / "manifest.json").is_file()
    cos = report["task_vector_cosine"]
    assert len(cos["matrix"]) == 4 and all(abs(cos["matrix"][i][i] - 1) < 1e-3 for i in range(4))


def test_rerun_skips_finished_stages(tiny_run, monkeypatch):
    import alignx.interference as interference
    import alignx.router.calibrate as calibrate
    import alignx.train.trainer as trainer
    from alignx.pipeline import run_pipeline, run_train

    layout = ArtifactLayout(tiny_run.run_dir)
    before = {a: layout.load_adapter_manifest(a).created_at for a in [*AXES, MULTITASK]}

    def boom(*a, **k):
        raise AssertionError("a finished adapter was retrained")

    monkeypatch.setattr(trainer, "train_all", boom)
    out = run_train(tiny_run, list(AXES), multitask=True)
    assert set(out) == {*[a.value for a in AXES], MULTITASK}
    assert {a: layout.load_adapter_manifest(a).created_at for a in before} == before
    # the whole pipeline again: every stage is finished, nothing is recomputed
    monkeypatch.setattr(interference, "stage1_report", boom)
    monkeypatch.setattr(calibrate, "calibrate_router", boom)
    run_pipeline(tiny_run)
