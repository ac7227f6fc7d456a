"""Slow: H3Fusion gates trained with Ray Train + DeepSpeed on the tiny pipeline run, then the
Serve app with every baseline enabled answers base / multitask / h3fusion / alignx-softmax
over HTTP, and the served h3fusion generates exactly what the shared in-process loader does."""

from __future__ import annotations

import httpx
import pytest

from alignx.axes import AXES

pytestmark = pytest.mark.slow

PORT = 8320
APP = "alignx-baselines"
PROMPT = "Is it true that bulls hate the colour red?"


@pytest.fixture(scope="module")
def served(gated_run):
    from ray import serve

    from alignx.serve.app import build_app

    cfg, _ = gated_run
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    opts = {"ray_actor_options": {"num_cpus": 0.05}, "health_check_period_s": 1.0,
            "graceful_shutdown_timeout_s": 2.0, "graceful_shutdown_wait_loop_s": 0.5}
    args = {"run_dir": cfg.run_dir, "model": cfg.model.name, "encoder": cfg.router.encoder,
            "baselines": ["base", "multitask", "h3fusion"], "default_max_tokens": 8,
            "expert_options": opts, "router_options": opts}
    serve.run(build_app(args), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{PORT}"
    serve.delete(APP)
    serve.shutdown()


def _chat(url: str, model: str, **kw) -> dict:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8,
        "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_gates_trained_and_published(gated_run):
    from alignx.baselines.h3fusion import GATES_FILE, h3fusion_dir, train_h3fusion

    cfg, m = gated_run
    out = h3fusion_dir(cfg.run_dir)
    assert (out / GATES_FILE).is_file() and (out / "config.yaml").is_file()
    assert m.steps == cfg.baselines.h3fusion.steps and m.train_tokens > 0
    assert m.axes == list(AXES) and set(m.experts) == {a.value for a in AXES}
    assert m.gated_modules > 0 and m.gate_params > 0 and m.template_id.startswith("union:")
    assert m.config_hash == cfg.stage_hash("baselines") and set(m.eval_loss) == {
        a.value for a in AXES}
    again = train_h3fusion(cfg)  # up to date: not retrained
    assert again.created_at == m.created_at


def test_models_list_every_system(served):
    ids = [m["id"] for m in httpx.get(f"{served}/v1/models").json()["data"]]
    assert {"alignx", "alignx-softmax", "base", "multitask", "h3fusion"} <= set(ids)
    assert {f"expert-{a.value}" for a in AXES} <= set(ids)


@pytest.mark.parametrize("model", ["base", "multitask", "h3fusion"])
def test_baselines_answer_over_http(served, model):
    out = _chat(served, model)
    info = out["alignx"]
    assert info["system"] == model and info["axis"] is None and info["routed"] is False
    assert info["adapter"] == model and out["usage"]["completion_tokens"] > 0


def test_softmax_router_answers_over_http(served):
    for model in ("alignx", "alignx-softmax"):
        info = _chat(served, model)["alignx"]
        assert info["system"] == model and info["routed"] is True
        assert info["axis"] in {a.value for a in AXES}
        assert abs(sum(info["weights"].values()) - 1) < 1e-5
    route = httpx.post(f"{served}/v1/route", json={
        "messages": [{"role": "user", "content": PROMPT}]}).json()["alignx"]
    assert route["system"] == "alignx"


def test_served_h3fusion_matches_the_scoring_loader(served, gated_run):
    import torch

    from alignx.baselines.systems import load_system
    from alignx.serve.backend import HFBackend, SamplingParams

    cfg, _ = gated_run
    torch.set_num_threads(1)
    ls = load_system("h3fusion", cfg.run_dir, cfg.model)
    msgs = [{"role": "user", "content": PROMPT}]
    local = HFBackend(ls.model, ls.tokenizer).generate([ls.prompt(msgs)], [SamplingParams(8)])[0]
    out = _chat(served, "h3fusion")
    assert out["choices"][0]["message"]["content"] == local.text
    assert out["usage"]["prompt_tokens"] == local.prompt_tokens


def test_cost_of_h3fusion_in_a_fresh_process(gated_run):
    from alignx.baselines.cost import measure_costs

    cfg, _ = gated_run
    res = measure_costs(cfg.run_dir, cfg.model, ["h3fusion"], n_prompts=2, max_tokens=4)
    s = res["systems"]["h3fusion"]
    assert s["requests"] == 2 and s["latency_ms_p50"] > 0 and s["peak_rss_mib"] > s["weights_mib"]
    assert res["comparison"] is None and "fresh process" in res["method"]
