"""The evaluation stage on shared storage: ``eval/`` is one artifact, finished by its manifest,
published whole, and a pipeline on another node skips a finished evaluation it fetches."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignx.config import AlignXConfig


def _cfg(run_dir: Path, storage: str) -> AlignXConfig:
    return AlignXConfig.model_validate({"run_dir": str(run_dir), "storage": storage})


def _fake_report(cfg: AlignXConfig) -> dict:
    return {"model": cfg.model.name, "config_hash": cfg.stage_hash("evaluate"),
            "judges": {"harmlessness": "fake-safety"}, "fake_judges": ["harmlessness"],
            "systems": {}}


def test_finished_evaluation_is_published_and_skipped_on_another_node(tmp_path, monkeypatch):
    import alignx.eval.report as report_mod
    import alignx.eval.run as run_mod
    from alignx.artifacts import read_json, write_json_atomic
    from alignx.pipeline import run_evaluate

    shared = str(tmp_path / "shared")
    a, b = _cfg(tmp_path / "a" / "run", shared), _cfg(tmp_path / "b" / "run", shared)
    out = run_mod.eval_dir(a)
    out.mkdir(parents=True)
    (out / "generations.jsonl").write_text('{"system": "alignx"}\n')
    (out / "scores.png").write_bytes(b"\x89PNG fake")
    report = _fake_report(a)
    write_json_atomic(run_mod.report_path(a), report)
    run_mod._finish_eval_dir(a, report)
    man = read_json(run_mod.eval_manifest_path(a))
    assert man["config_hash"] == a.stage_hash("evaluate") and man["fake_judges"] == ["harmlessness"]
    assert man["files"] == ["generations.jsonl", "report.json", "scores.png"]
    assert (Path(shared) / "run" / "eval" / "manifest.json").is_file()

    def boom(*_a, **_k):
        raise AssertionError("a finished evaluation was redone")

    monkeypatch.setattr(run_mod, "evaluate", boom)
    monkeypatch.setattr(report_mod, "markdown_table", lambda r: f"TABLE of {r['model']}")
    run_evaluate(b)  # node B: empty run_dir, the evaluation comes from shared storage
    assert (run_mod.eval_dir(b) / "scores.png").read_bytes() == b"\x89PNG fake"
    assert read_json(run_mod.report_path(b)) == report


def test_an_unfinished_or_stale_evaluation_is_redone(tmp_path, monkeypatch):
    import alignx.eval.run as run_mod
    from alignx.artifacts import write_json_atomic
    from alignx.pipeline import run_evaluate

    cfg = _cfg(tmp_path / "run", str(tmp_path / "shared"))
    out = run_mod.eval_dir(cfg)
    out.mkdir(parents=True)
    # report.json without the manifest: the run was interrupted between the two writes
    write_json_atomic(run_mod.report_path(cfg), _fake_report(cfg))
    calls = []
    monkeypatch.setattr(run_mod, "evaluate", lambda c: calls.append(c))
    run_evaluate(cfg)
    assert len(calls) == 1
    # a manifest from other eval settings is stale
    stale = {**_fake_report(cfg), "config_hash": "0" * 64}
    run_mod._finish_eval_dir(cfg, stale)
    run_evaluate(cfg)
    assert len(calls) == 2


@pytest.mark.parametrize("exists", [True, False])
def test_evaluate_marks_eval_dir_unfinished_while_it_runs(tmp_path, monkeypatch, exists):
    import alignx.eval.run as run_mod
    from alignx.config import AlignXConfigError

    monkeypatch.delenv("ALIGNX_DATA_DIR", raising=False)

    cfg = _cfg(tmp_path / "run", str(tmp_path / "shared"))
    run_mod.eval_dir(cfg).mkdir(parents=True)
    if exists:
        run_mod._finish_eval_dir(cfg, _fake_report(cfg))
    with pytest.raises(AlignXConfigError, match="no data directory"):  # stops early
        run_mod.evaluate(cfg, url="http://127.0.0.1:9", progress=False)
    assert not run_mod.eval_manifest_path(cfg).exists()
