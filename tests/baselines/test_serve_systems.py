"""The baselines on the ingress (no Ray): model ids, dispatch to system handles, the softmax
router, the ``alignx`` object naming the system; AppArgs/deployment options; cost summaries."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from alignx.artifacts import ArtifactNotFoundError
from alignx.axes import Axis
from alignx.serve.router import AlignXRouter, MemoryMetrics, RoutingInfo, build_router_api

_here = Path(__file__).resolve().parents[1] / "serve"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


rf = _load("baselines_routing_fixture", _here / "routing_fixture.py")
rl = _load("baselines_router_logic", _here / "test_router_logic.py")
conf = _load("baselines_serve_conftest", _here / "conftest.py")

HARM = "How do I make a weapon to hurt someone?"


class SoftmaxKeywordRouting(rf.KeywordRouting):
    """The keyword router plus a deliberately different 'raw softmax': always helpfulness."""

    def route_softmax(self, features: np.ndarray) -> list[RoutingInfo]:
        w = {Axis.HELPFULNESS: 0.5, Axis.HARMLESSNESS: 0.3, Axis.HONESTY: 0.2}
        return [RoutingInfo(Axis.HELPFULNESS, w, 0.5, ood=False) for _ in features]


def make(routing=None, systems=("base", "multitask", "h3fusion")):
    experts = {a: rl.FakeExpert(a.value) for a in Axis}
    handles = {n: rl.FakeExpert(n) for n in systems}
    metrics = MemoryMetrics()
    router = AlignXRouter(experts, routing or SoftmaxKeywordRouting(), rf.KeywordEncoder(),
                          metrics=metrics, systems=handles)
    client = TestClient(build_router_api(router), raise_server_exceptions=False)
    return client, experts, handles, metrics


def _post(client, model, content=HARM, **kw):
    return client.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": content}], **kw})


def test_models_lists_routed_softmax_experts_and_baselines():
    client, *_ = make()
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["alignx", "alignx-softmax", "expert-helpfulness", "expert-harmlessness",
                   "expert-honesty", "base", "multitask", "h3fusion"]
    client, *_ = make(routing=rf.KeywordRouting(), systems=())  # no route_softmax: no baseline
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert "alignx-softmax" not in ids and "alignx" in ids and "base" not in ids


@pytest.mark.parametrize("name", ["base", "multitask", "h3fusion"])
def test_a_baseline_answers_through_its_own_handle(name):
    client, experts, handles, metrics = make()
    r = _post(client, name)
    assert r.status_code == 200, r.text
    info = r.json()["alignx"]
    assert info["system"] == name and info["axis"] is None and info["routed"] is False
    assert info["adapter"] == name and info["weights"] == {}
    assert len(handles[name].calls) == 1 and not any(e.calls for e in experts.values())
    assert handles[name].calls[0].messages[-1]["content"] == HARM  # no injection at the ingress
    assert metrics.records[-1]["axis"] == name and metrics.records[-1]["status"] == 200


def test_softmax_and_calibrated_routing_differ():
    client, experts, *_ = make()
    cal = _post(client, "alignx").json()["alignx"]
    soft = _post(client, "alignx-softmax").json()["alignx"]
    assert cal["system"] == "alignx" and cal["axis"] == "harmlessness" and cal["routed"]
    assert soft["system"] == "alignx-softmax" and soft["axis"] == "helpfulness" and soft["routed"]
    assert soft["weights"]["helpfulness"] == 0.5 and soft["ood"] is False
    assert len(experts[Axis.HELPFULNESS].calls) == 1 and len(experts[Axis.HARMLESSNESS].calls) == 1
    expert = _post(client, "expert-honesty").json()["alignx"]
    assert expert["system"] == "expert-honesty" and expert["axis"] == "honesty"


def test_baseline_streams_and_unknown_models_are_404():
    client, _, handles, _ = make(systems=("base",))
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "base", "stream": True,
            "messages": [{"role": "user", "content": "hi there"}]}) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: {")]
    assert r.status_code == 200 and '"system":"base"' in lines[0] and '"system":"base"' in lines[-1]
    for model in ("h3fusion", "multitask", "system-base"):  # not enabled / not a model id
        r = _post(client, model)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "base" in r.json()["error"]["message"]


def test_system_names_may_not_shadow_model_ids():
    with pytest.raises(ValueError, match="clash"):
        make(systems=("alignx-softmax",))


# ----------------------------------------------------------------------------- app args


def test_app_args_baselines_and_deployment_options(tmp_path):
    from alignx.serve.app import AppArgs, build_app, deployment_options

    a = AppArgs(run_dir="x", model="tiny-llama", baselines=["base", "h3fusion"],
                expert_options={"ray_actor_options": {"num_cpus": 0.05}})
    opts = deployment_options(a)
    assert {"system-base", "system-h3fusion"} <= set(opts) and "system-multitask" not in opts
    assert opts["system-base"]["ray_actor_options"]["num_cpus"] == 0.05
    assert "system-base" not in deployment_options(AppArgs(run_dir="x", model="tiny-llama"))
    with pytest.raises(ValidationError, match="baselines"):
        AppArgs(run_dir="x", model="tiny-llama", baselines=["gpt4"])
    with pytest.raises(ValidationError, match="duplicates"):
        AppArgs(run_dir="x", model="tiny-llama", baselines=["base", "base"])
    run = conf.make_run_dir(tmp_path / "run")  # experts, no multitask, no gates
    with pytest.raises(ArtifactNotFoundError, match="h3fusion"):
        build_app({"run_dir": str(run), "model": "tiny-llama", "baselines": ["h3fusion"]})
    with pytest.raises(ArtifactNotFoundError, match="multitask"):
        build_app({"run_dir": str(run), "model": "tiny-llama", "baselines": ["multitask"]})
    assert build_app({"run_dir": str(run), "model": "tiny-llama", "baselines": ["base"]})


# ----------------------------------------------------------------------------- cost summaries


def test_cost_summary_and_claim_check():
    from alignx.baselines.cost import _summary, claim_check, format_costs

    runs = [{"latencies_ms": [100.0, 200.0, 300.0], "cpu_ms": [90.0, 180.0, 270.0],
             "completion_tokens": [10, 10, 10],
             "peak_rss_mib": 500.0, "rss_mib": 450.0, "weights_mib": 100.0, "load_s": 1.0}]
    s = _summary(runs)
    assert s["latency_ms_p50"] == 200.0 and s["ms_per_token"] == 20.0 and s["requests"] == 3
    assert s["cpu_ms_p50"] == 180.0 and s["cpu_ms_per_token"] == 18.0
    fast = {**s, "latency_ms_p50": 100.0, "ms_per_token": 10.0, "peak_rss_mib": 400.0,
            "weights_mib": 60.0, "cpu_ms_p50": 90.0, "cpu_ms_per_token": 9.0}
    check = claim_check({"alignx": fast, "h3fusion": s})
    assert check["latency_ms_p50"]["reduction"] == pytest.approx(0.5)
    assert check["latency_ms_p50"]["meets_claim"] and not check["peak_rss_mib"]["meets_claim"]
    assert check["weights_mib"]["meets_claim"]
    assert claim_check({"alignx": s}) is None
    text = format_costs({"systems": {"alignx": fast, "h3fusion": s}, "claim": "c"})
    assert "alignx" in text and "h3fusion" in text and text.endswith("c")


def test_worker_peak_rss_is_its_own_not_its_parents():
    """A cost worker forked from a big driver reports its own peak, not the driver's (Linux
    carries ``ru_maxrss`` over ``execve``; the evaluation reported 3,262 MiB for every system)."""
    import subprocess

    from alignx.baselines.cost import _peak_rss_mib

    ballast = bytearray(600 * 2**20)  # touch 600 MiB in this (the parent) process
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    assert _peak_rss_mib() > 600
    code = "from alignx.baselines.cost import _peak_rss_mib; print(_peak_rss_mib())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout)
    del ballast
    assert 5 < child < 400, child  # python + numpy + the module, not the parent's 600 MiB


def test_cost_rejects_unknown_systems(tmp_path):
    from alignx.baselines.cost import measure_costs

    with pytest.raises(ValueError, match="unknown system"):
        measure_costs(tmp_path, {"name": "tiny-llama"}, ["gpt4"], prompts=[[]])


def test_calibrated_router_routes_by_its_raw_softmax():
    """``route_softmax`` is the ablation table's ``raw_softmax`` row, without OOD flags."""
    from alignx.axes import AXES
    from alignx.router.mocae import MoCaEConfig, MoCaERouter
    from alignx.router.serving import CalibratedRouter

    rng = np.random.default_rng(0)

    def clusters(n):
        x = np.concatenate([5.0 * np.eye(8)[i] + 0.3 * rng.standard_normal((n, 8)) for i in range(3)])
        return x.astype(np.float32), np.repeat(np.arange(3), n)

    (x_tr, y_tr), (x_va, y_va) = clusters(40), clusters(15)
    router = MoCaERouter(MoCaEConfig(latent_dim=256, lr=1e-2, max_epochs=40, ood_radius=1.0))
    router.fit(x_tr, y_tr, x_va, y_va)
    cr = CalibratedRouter(router, {"axes": [a.value for a in AXES], "encoder": "fake",
                                   "base_model": "tiny-llama"})
    far = np.full((1, 8), 40.0, dtype=np.float32)  # off every cluster: OOD for MoCaE
    x = np.concatenate([x_va[:: 15], far])
    soft, cal = cr.route_softmax(x), cr.route(x)
    raw = router.ablation_probs(x)["raw_softmax"]
    for i, info in enumerate(soft):
        assert info.weights == pytest.approx({a: float(raw[i, j]) for j, a in enumerate(AXES)})
        assert info.axis == AXES[int(raw[i].argmax())] and info.confidence == pytest.approx(
            float(raw[i].max())) and info.ood is False
    assert [i.axis for i in soft[:3]] == list(AXES) and cal[-1].ood and not soft[-1].ood
