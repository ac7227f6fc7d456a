"""build_app / AppArgs / serve_config.yaml without starting Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from alignx.artifacts import ArtifactNotFoundError
from alignx.serve.app import AppArgs, build_app, deployment_options

REPO = Path(__file__).resolve().parents[2]


def test_serve_config_validates():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    assert app.import_path == "alignx.serve.app:build_app"
    assert schema.http_options.host == "127.0.0.1"
    args = AppArgs.model_validate(app.args)
    names = {d.name for d in app.deployments}
    assert names == set(deployment_options(args))  # one per axis + router, same names
    for d in app.deployments:
        assert 0 < d.ray_actor_options.num_cpus < 1
        assert d.autoscaling_config is not None and d.max_queued_requests > 0


def test_app_args_errors_name_the_field():
    with pytest.raises(ValidationError, match="threshold"):
        AppArgs(run_dir="x", model="tiny-llama", threshold=2)
    with pytest.raises(ValidationError, match="polcy"):
        AppArgs.model_validate({"run_dir": "x", "model": "tiny-llama", "polcy": "top1"})
    with pytest.raises(ValidationError, match="config"):
        AppArgs(run_dir="x")


def test_auth_env_must_be_set(monkeypatch):
    monkeypatch.delenv("ALIGNX_TEST_KEY", raising=False)
    a = AppArgs(run_dir="x", model="tiny-llama", auth_env="ALIGNX_TEST_KEY")
    with pytest.raises(ValueError, match="ALIGNX_TEST_KEY"):
        a.router_settings()
    monkeypatch.setenv("ALIGNX_TEST_KEY", "k")
    assert a.router_settings().api_key == "k"


def test_build_app_binds_one_expert_per_axis(tiny_run_dir):
    args = {"run_dir": str(tiny_run_dir), "model": "tiny-llama",
            "expert_options": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}}
    app = build_app(args)
    assert app is not None
    opts = deployment_options(AppArgs.model_validate(args))
    assert sorted(opts) == ["expert-harmlessness", "expert-helpfulness", "expert-honesty", "router"]
    assert opts["expert-honesty"]["autoscaling_config"]["max_replicas"] == 3
    assert opts["expert-honesty"]["max_queued_requests"] > 0  # load shedding on by default


def test_build_app_fails_early_without_adapters(tmp_path):
    with pytest.raises(ArtifactNotFoundError, match="alignx train"):
        build_app({"run_dir": str(tmp_path), "model": "tiny-llama"})


def test_threshold_fallback_must_be_a_served_axis(tmp_path):
    args = {"run_dir": str(tmp_path), "model": "tiny-llama", "policy": "threshold",
            "axes": ["helpfulness", "honesty"]}  # fallback defaults to harmlessness
    with pytest.raises(ValueError, match="fallback='harmlessness' is not a served axis"):
        build_app(args)  # refused before looking for adapters
    AppArgs.model_validate({**args, "fallback": "honesty"}).check_fallback()
    AppArgs.model_validate({**args, "policy": "top1"}).check_fallback()  # top1: no fallback
    with pytest.raises(ValueError, match="policy 'cost' out-of-distribution requests go to"):
        build_app({**args, "policy": "cost"})  # cost: OOD requests go to the fallback
    with pytest.raises(ValueError, match="miss_cost names 'harmlessness', not one of"):
        build_app({**args, "policy": "cost", "fallback": "honesty",
                   "miss_cost": {"harmlessness": 3}})


def test_the_run_configs_dispatch_policy_reaches_the_router(tmp_path):
    """`alignx serve` / the evaluation deploy the app from the run config (deploy.app_args)."""
    from alignx.axes import Axis
    from alignx.config import load_config
    from alignx.serve.deploy import app_args

    cfg = load_config(REPO / "jobs/configs/tiny.yaml",
                      ["router.policy=cost", "router.miss_cost={harmlessness: 3}"],
                      run_dir=str(tmp_path))
    s = AppArgs.model_validate(app_args(cfg)).router_settings()
    assert (s.policy, s.miss_cost, s.fallback) == ("cost", {Axis.HARMLESSNESS: 3.0},
                                                   Axis.HARMLESSNESS)
