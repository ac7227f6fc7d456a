"""Slow: the evaluate stage end to end — the run's app deployed on Ray Serve, every system
answered over HTTP, judged by the offline judges, MC1/MC2 scored, the report written; then
the four-model parallel evaluation with the tiny same-architecture models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from alignx.config import load_config

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluated(gated_run, tmp_path_factory):
    """A copy of the tiny run with its H3Fusion gates (the session's ``gated_run``, so the
    pipeline finds that stage finished) taken through deploy + evaluate with every system
    and the offline judges."""
    from alignx.pipeline import run_pipeline

    run_dir = tmp_path_factory.mktemp("evaluated") / "run"
    shutil.copytree(gated_run[0].run_dir, run_dir)
    cfg = load_config(run_dir / "config.yaml", [
        "eval.prompts_per_axis=2", "eval.max_tokens=8", "eval.bootstrap_samples=50",
        "eval.cost_prompts=2", "eval.concurrency=2", "eval.serve_port=8341",
    ], run_dir=str(run_dir))
    run_pipeline(cfg)
    return cfg


def test_every_system_is_evaluated_over_http_and_reported(evaluated):
    from alignx.config import EVAL_SYSTEMS

    out = Path(evaluated.run_dir) / "eval"
    report = json.loads((out / "report.json").read_text())
    assert list(report["systems"]) == list(EVAL_SYSTEMS)
    assert report["generation"]["via"].startswith("http://127.0.0.1:")
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert {g["system"] for g in gens} == set(EVAL_SYSTEMS)
    assert len(gens) == len(EVAL_SYSTEMS) * 6 and not any(g["error"] for g in gens)
    # routed systems say which expert answered; baselines do not route
    assert all(g["routed_axis"] for g in gens if g["system"].startswith("alignx"))
    for name, row in report["systems"].items():
        for k in ("win_rate", "safety_score", "truthful_informative", "mc1", "mc2"):
            cell = row[k]
            assert cell["low"] <= cell["value"] <= cell["high"], (name, k)
            assert cell["judge"], (name, k)
        assert row["alignment_score"]["value"] == pytest.approx(
            (row["win_rate"]["value"] + row["truthful_informative"]["value"]
             - row["safety_score"]["value"]) / 3, abs=1e-2)
    assert report["systems"]["base"]["win_rate"]["value"] == 50.0  # base vs itself
    assert report["systems"]["alignx"]["win_rate"]["judge"].startswith("proxy ")
    assert set(report["cost"]["systems"]) == set(EVAL_SYSTEMS)
    md = (out / "report.md").read_text()
    assert "| system | WR ↑ | SS ↓ | TI ↑ | MC1 ↑ | MC2 ↑ | Avg ↑ |" in md
    assert (out / "scores.png").stat().st_size > 1000 and (out / "cost.png").is_file()


def test_a_finished_evaluation_is_not_redone_and_answers_are_reused(evaluated, capsys,
                                                                    monkeypatch):
    import alignx.serve.deploy as deploy
    from alignx.eval.run import evaluate
    from alignx.pipeline import run_pipeline

    out = Path(evaluated.run_dir) / "eval"
    before = (out / "generations.jsonl").read_text()
    mtime = (out / "report.json").stat().st_mtime_ns
    run_pipeline(evaluated)  # every stage up to date
    assert (out / "report.json").stat().st_mtime_ns == mtime
    assert "| alignx |" in capsys.readouterr().out  # the table is printed again
    # a changed scoring setting rescores from the stored answers: no new generations, and no
    # app is deployed to ask nothing
    via = json.loads((out / "report.json").read_text())["generation"]["via"]

    def no_deploy(*a, **k):
        raise AssertionError("the app was deployed although every answer is stored")

    monkeypatch.setattr(deploy, "deploy", no_deploy)
    cfg = evaluated.model_copy(update={"eval": evaluated.eval.model_copy(
        update={"bootstrap_samples": 60, "cost": False, "mc": False})})
    report = evaluate(cfg, progress=False)
    assert (out / "generations.jsonl").read_text() == before
    assert report["generation"]["via"] == via  # where the stored answers came from
    assert list(report["systems"]) == list(evaluated.eval.systems)  # every system rescored


def test_four_models_are_evaluated_in_parallel(ray_local, tmp_path):
    from ray import serve

    from alignx.eval.run import evaluate_models

    models = ["tiny-llama", "tiny-mistral", "tiny-gemma", "tiny-deepseek"]
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", [
        f"data.data_dir={FIXTURES}", "train.optim.max_steps=2", "train.checkpoint_every=2",
        "train.scaling.cpus_per_worker=0.5", "eval.systems=[alignx,base]",
        "eval.prompts_per_axis=1", "eval.max_tokens=4", "eval.bootstrap_samples=20",
        "eval.cost=false", "eval.validate_judges=false", "eval.serve_port=8341",
        # 0.5 CPU per training worker: at most 4 runs start at once on 2 cores (0.1 let all 12
        # start together: 937 s against 754 s). The multi-task baseline, the encoder fine-tune
        # and the third axis are covered by the one-model tests (tiny_run, `evaluated`); here
        # each costs four more training runs or processes on 2 cores. Two axes still give
        # every model a routed app of two experts.
        "train.multitask=false", "router.finetune_epochs=0", "axes=[helpfulness,harmlessness]",
        # the full router report is checked on tiny_run; here all ten evaluation sets would be
        # embedded four times over for nothing the test reads
        "router.evaluation_sets=[intent_set.jsonl]",
    ], run_dir=str(tmp_path / "four"))
    comparison = evaluate_models(cfg, models)
    assert comparison["models"] == models and not comparison["failed"]
    assert {(r["model"], r["system"]) for r in comparison["rows"]} == {
        (m, s) for m in models for s in ("alignx", "base")}
    for m in models:
        report = json.loads((tmp_path / "four" / m / "eval" / "report.json").read_text())
        assert report["model"] == m
        assert report["generation"]["via"].endswith(f"/{m}")  # its own route prefix
        assert report["systems"]["alignx"]["safety_score"]["n"] == 1
        assert report["prompts_per_axis"] == {"helpfulness": 1, "harmlessness": 1}
        assert not (tmp_path / "four" / m / "adapters" / "multitask").exists()  # not trained
    assert (tmp_path / "four" / "comparison.md").read_text().count("| tiny-") == 8
    assert (tmp_path / "four" / "comparison.png").is_file()
    apps = serve.status().applications
    assert not any(name.startswith("alignx-tiny") for name in apps)  # torn down afterwards
