"""Slow: the whole Serve app on local Ray with tiny-llama experts and a test routing model.

HTTP over 127.0.0.1 reaches the right expert per axis, the official ``openai`` client
round-trips (plain and streamed), a burst of one axis's prompts scales up that expert only,
and killing an expert replica during a burst leaves the service answering.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import socket
import time
from pathlib import Path

import httpx
import pytest

from alignx.axes import Axis

pytestmark = pytest.mark.slow

_here = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("serve_conftest_app", _here / "conftest.py")
_conf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conf)
_spec2 = importlib.util.spec_from_file_location("serve_routing_app", _here / "routing_fixture.py")
rf = importlib.util.module_from_spec(_spec2)
_spec2.loader.exec_module(rf)

PROMPTS = {
    Axis.HELPFULNESS: "Give me three tips for staying healthy.",
    Axis.HARMLESSNESS: "How can I poison my neighbour's dog without anyone noticing?",
    Axis.HONESTY: "What happens if you swallow chewing gum? Does it stay for seven years?",
}
APP = "alignx"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    from ray import serve

    from alignx.serve.app import build_app

    run_dir = _conf.make_run_dir(tmp_path_factory.mktemp("serve-run"))
    rf.write_routing_prompts(run_dir, {a.value: [p] for a, p in PROMPTS.items()}, "tiny-llama")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    fast = {"health_check_period_s": 1.0, "health_check_timeout_s": 20.0,
            "graceful_shutdown_timeout_s": 2.0, "graceful_shutdown_wait_loop_s": 0.5}
    args = {
        "run_dir": str(run_dir), "model": "tiny-llama", "encoder": "base",
        "routing_model": "tests.serve.routing_fixture:load_centroid_routing",
        "default_max_tokens": 8, "max_batch_size": 4, "batch_wait_timeout_s": 0.02,
        "share_base_weights": True,
        "expert_options": {
            **fast, "ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 4,
            "autoscaling_config": {
                "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                "upscale_delay_s": 0.5, "downscale_delay_s": 600, "metrics_interval_s": 0.5,
                "look_back_period_s": 1.0}},
        "router_options": {**fast, "ray_actor_options": {"num_cpus": 0.1}},
    }
    t0 = time.time()
    serve.run(build_app(args), name=APP, route_prefix="/")
    print(f"serve.run ready in {time.time() - t0:.1f}s")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _replicas(deployment: str, states: tuple[str, ...] = ("RUNNING",)) -> int:
    from ray import serve

    counts = serve.status().applications[APP].deployments[deployment].replica_states
    return int(sum(counts.get(s, 0) for s in states))


_LIVE = ("STARTING", "UPDATING", "RECOVERING", "RUNNING")


def _chat(base: str, axis: Axis, client: httpx.Client | None = None, **kw) -> httpx.Response:
    c = client or httpx
    return c.post(f"{base}/v1/chat/completions", timeout=120, json={
        "model": "alignx", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": PROMPTS[axis]}], **kw})


def test_http_routes_each_axis_to_its_expert(served):
    assert httpx.get(f"{served}/healthz", timeout=30).json()["status"] == "ok"
    for axis in Axis:
        r = _chat(served, axis)
        assert r.status_code == 200, r.text
        info = r.json()["alignx"]
        assert info["axis"] == axis.value and info["adapter"] == axis.value, info
        assert info["route_ms"] > 0 and info["expert_ms"] > 0 and info["run"]
    bad = httpx.post(f"{served}/v1/chat/completions", content=b"{", timeout=30)
    assert bad.status_code == 400 and "error" in bad.json()
    assert httpx.post(f"{served}/v1/chat/completions", timeout=30, json={
        "model": "nope", "messages": [{"role": "user", "content": "x"}]}).status_code == 404


def test_experts_run_the_torch_free_engine(served):
    """engine: auto on a CPU replica of a supported model: numpy, and no torch in the process
    (the lean hook, the app module's imports and the tokenizer all stay torch-free)."""
    from ray import serve

    for axis in Axis:
        info = serve.get_deployment_handle(f"expert-{axis.value}", APP).info.remote().result()
        assert info["engine"] == "numpy" and info["torch_loaded"] is False, info


def test_openai_client_round_trip(served):
    from openai import OpenAI

    client = OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0, timeout=120)
    assert "alignx" in [m.id for m in client.models.list().data]
    out = client.chat.completions.create(
        model="alignx", max_tokens=6, temperature=0,
        messages=[{"role": "user", "content": PROMPTS[Axis.HONESTY]}])
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.model_extra["alignx"]["axis"] == "honesty"
    direct = client.chat.completions.create(
        model="expert-honesty", max_tokens=6, temperature=0,
        messages=[{"role": "user", "content": PROMPTS[Axis.HONESTY]}])
    assert direct.choices[0].message.content == out.choices[0].message.content  # same expert
    stream = client.chat.completions.create(
        model="alignx", max_tokens=6, temperature=0, stream=True,
        messages=[{"role": "user", "content": PROMPTS[Axis.HONESTY]}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def _burst(base: str, axis: Axis, n: int, workers: int, max_tokens: int) -> list[int]:
    with httpx.Client() as client, cf.ThreadPoolExecutor(workers) as pool:
        futs = [pool.submit(_chat, base, axis, client, max_tokens=max_tokens) for _ in range(n)]
        out = []
        for f in futs:
            try:
                out.append(f.result().status_code)
            except Exception:  # noqa: BLE001 - a dropped connection counts as a failure
                out.append(-1)
        return out


def test_burst_scales_only_that_axis(served):
    assert all(_replicas(f"expert-{a.value}") == 1 for a in Axis)
    with cf.ThreadPoolExecutor(1) as bg:
        fut = bg.submit(_burst, served, Axis.HONESTY, 48, 12, 64)
        peak, others, deadline = 1, 0, time.time() + 120
        while not fut.done() and time.time() < deadline:
            peak = max(peak, _replicas("expert-honesty", _LIVE))
            others = max(others, *(_replicas(f"expert-{a.value}", _LIVE)
                                   for a in (Axis.HELPFULNESS, Axis.HARMLESSNESS)))
            time.sleep(0.5)
        codes = fut.result()
    peak = max(peak, _replicas("expert-honesty", _LIVE))
    print(f"burst: peak expert-honesty replicas={peak}, codes={sorted(set(codes))}")
    assert peak == 2
    assert others == 1  # the other axes never scaled
    assert all(c == 200 for c in codes)


def test_killing_an_expert_replica_keeps_the_service_answering(served):
    import ray
    from ray.util.state import list_actors

    dep = "expert-harmlessness"
    # address: this session's cluster (another Ray on the machine would make discovery ambiguous)
    gcs = ray.get_runtime_context().gcs_address
    actors = [a for a in list_actors(address=gcs, filters=[("state", "=", "ALIVE")], limit=1000)
              if a.class_name.endswith(f":{dep}") and a.name]
    assert actors, "no replica actor found"
    with cf.ThreadPoolExecutor(1) as bg:
        fut = bg.submit(_burst, served, Axis.HARMLESSNESS, 16, 4, 24)
        time.sleep(1.0)
        ray.kill(ray.get_actor(actors[0].name, namespace="serve"), no_restart=True)
        codes = fut.result()
    failed = sum(c != 200 for c in codes)
    print(f"replica kill: {failed}/{len(codes)} requests failed during the burst")
    # Serve replaces the replica; the service must answer again.
    deadline, ok = time.time() + 90, False
    while time.time() < deadline and not ok:
        ok = _chat(served, Axis.HARMLESSNESS).status_code == 200 and _replicas(dep) >= 1
        time.sleep(1)
    assert ok and failed < len(codes)
