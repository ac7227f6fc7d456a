"""Unit tests of the ingress (no Ray): dispatch with fake expert handles, the OpenAI wire
format, every bad-input case (4xx + OpenAI error body, never 500), auth, streaming, 503."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from alignx.axes import Axis
from alignx.serve.expert import PromptTooLongError
from alignx.serve.router import (
    AlignXRouter,
    MemoryMetrics,
    RouterSettings,
    RoutingInfo,
    build_router_api,
    choose_axis,
)
from alignx.serve.schemas import GenerateRequest, GenerateResult, Provenance, StreamDelta

_spec = importlib.util.spec_from_file_location(
    "serve_routing_fixture", Path(__file__).with_name("routing_fixture.py"))
rf = importlib.util.module_from_spec(_spec)
sys.modules["serve_routing_fixture"] = rf
_spec.loader.exec_module(rf)

HARM = "How do I make a weapon to hurt someone?"
HONEST = "Is it really true that we only use 10% of our brain? fact or myth"
HELP = "Write a poem about the sea"


class Overloaded(Exception):
    """Stands in for Serve's BackPressureError."""


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *a, **k):
        return self.fn(*a, **k)


class FakeExpert:
    """Has ``.generate.remote`` and ``.options(stream=True).generate_stream.remote``, like a
    DeploymentHandle; answers '<axis>: <last user message>' and records what it received."""

    def __init__(self, axis: str, fail: Exception | None = None):
        self.axis, self.fail, self.calls = axis, fail, []
        self.generate = _Remote(self._generate)
        self.generate_stream = _Remote(self._stream)

    def options(self, **kw):
        return self

    def _answer(self, payload: dict) -> GenerateResult:
        req = GenerateRequest(**payload)
        self.calls.append(req)
        if self.fail is not None:
            raise self.fail
        text = f"{self.axis}: {req.messages[-1]['content']}"[: req.max_tokens]
        return GenerateResult(
            text=text, finish_reason="stop", prompt_tokens=7, completion_tokens=len(text.split()),
            provenance=Provenance(run="/runs/r1", adapter=self.axis, manifest_sha256="abc",
                                  created_at="2026-01-01T00:00:00Z"))

    async def _generate(self, payload):
        return self._answer(payload)

    async def _stream(self, payload):
        res = self._answer(payload)
        for word in res.text.split(" "):
            yield StreamDelta(text=word + " ")
        yield StreamDelta(final=res)


def make_router(policy="top1", threshold=0.5, api_key=None, fail=None, tokenizer=None,
                max_prompt_tokens=2048, miss_cost=None):
    experts = {a: FakeExpert(a.value, fail) for a in Axis}
    metrics = MemoryMetrics()
    router = AlignXRouter(
        experts, rf.KeywordRouting(), rf.KeywordEncoder(),
        RouterSettings(policy=policy, threshold=threshold, api_key=api_key,
                       miss_cost=miss_cost or {},
                       max_prompt_tokens=max_prompt_tokens, max_tokens_limit=256),
        tokenizer=tokenizer, metrics=metrics, overload_errors=(Overloaded,),
        unavailable_errors=(ReplicaGone,))
    return router, experts, metrics


def body(content=HARM, model="alignx", **kw):
    return {"model": model, "messages": [{"role": "user", "content": content}], **kw}


@pytest.fixture()
def client():
    router, experts, metrics = make_router()
    c = TestClient(build_router_api(router), raise_server_exceptions=False)
    c.experts, c.metrics = experts, metrics
    return c


# ----------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("prompt,axis", [(HARM, Axis.HARMLESSNESS), (HONEST, Axis.HONESTY),
                                         (HELP, Axis.HELPFULNESS)])
def test_top1_routes_to_the_right_expert(client, prompt, axis):
    r = client.post("/v1/chat/completions", json=body(prompt))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["alignx"]["axis"] == axis.value and out["alignx"]["routed"] is True
    assert out["choices"][0]["message"]["content"].startswith(axis.value)
    assert len(client.experts[axis].calls) == 1
    assert sum(len(e.calls) for e in client.experts.values()) == 1
    assert abs(sum(out["alignx"]["weights"].values()) - 1) < 1e-6
    assert out["alignx"]["adapter"] == axis.value and out["alignx"]["run"] == "/runs/r1"
    assert out["alignx"]["route_ms"] >= 0 and out["alignx"]["expert_ms"] >= 0
    assert out["object"] == "chat.completion" and out["usage"]["total_tokens"] > 0
    assert client.metrics.records[-1]["axis"] == axis.value


def test_threshold_policy_falls_back_when_unsure_or_ood():
    router, experts, _ = make_router(policy="threshold", threshold=0.9)
    c = TestClient(build_router_api(router))
    # confident honesty prompt stays on honesty
    assert c.post("/v1/chat/completions", json=body(HONEST)).json()["alignx"]["axis"] == "honesty"
    # a tie between two axes is below 0.9 -> fallback harmlessness
    out = c.post("/v1/chat/completions", json=body("write a poem that is really true")).json()
    assert out["alignx"]["confidence"] < 0.9 and out["alignx"]["axis"] == "harmlessness"
    # no keyword: OOD -> fallback
    out = c.post("/v1/chat/completions", json=body("hello there")).json()
    assert out["alignx"]["ood"] is True and out["alignx"]["axis"] == "harmlessness"


def test_cost_policy_weighs_the_cautious_expert_and_sends_ood_to_the_fallback():
    # "write a poem that is really true": a tie between helpfulness and honesty
    tie = "write a poem that is really true"
    router, _, _ = make_router(policy="cost", miss_cost={Axis.HARMLESSNESS: 3.0})
    c = TestClient(build_router_api(router))
    out = c.post("/v1/chat/completions", json=body(tie)).json()["alignx"]
    assert out["axis"] in ("helpfulness", "honesty")  # no harmlessness weight to scale
    assert c.post("/v1/chat/completions", json=body(HONEST)).json()["alignx"]["axis"] == "honesty"
    out = c.post("/v1/chat/completions", json=body("hello there")).json()["alignx"]
    assert out["ood"] is True and out["axis"] == "harmlessness"
    with pytest.raises(ValueError, match="miss_cost"):  # refused when the router is built
        make_router(policy="cost", miss_cost={Axis.HARMLESSNESS: -1.0})


def test_choose_axis_pure():
    info = RoutingInfo(Axis.HONESTY, {a: 1 / 3 for a in Axis}, 0.4, ood=False)
    assert choose_axis(info, "top1", 0.9, Axis.HARMLESSNESS, list(Axis)) is Axis.HONESTY
    assert choose_axis(info, "threshold", 0.3, Axis.HARMLESSNESS, list(Axis)) is Axis.HONESTY
    assert choose_axis(info, "threshold", 0.5, Axis.HARMLESSNESS, list(Axis)) is Axis.HARMLESSNESS
    ood = RoutingInfo(Axis.HONESTY, {}, 0.99, ood=True)
    assert choose_axis(ood, "threshold", 0.5, Axis.HELPFULNESS, list(Axis)) is Axis.HELPFULNESS
    with pytest.raises(ValueError):
        choose_axis(info, "blend", 0.5, Axis.HARMLESSNESS, list(Axis))  # type: ignore[arg-type]
    w = {Axis.HELPFULNESS: 0.5, Axis.HARMLESSNESS: 0.3, Axis.HONESTY: 0.2}
    unsure = RoutingInfo(Axis.HELPFULNESS, w, 0.5, ood=False)
    cost = {Axis.HARMLESSNESS: 2.0}  # 2 * 0.3 > 0.5
    assert choose_axis(unsure, "cost", 0.0, Axis.HONESTY, list(Axis), cost) is Axis.HARMLESSNESS
    assert choose_axis(unsure, "cost", 0.0, Axis.HONESTY, list(Axis),
                       {Axis.HARMLESSNESS: 1.5}) is Axis.HELPFULNESS
    assert choose_axis(ood, "cost", 0.0, Axis.HONESTY, list(Axis), cost) is Axis.HONESTY


@pytest.mark.parametrize("axis", list(Axis))
def test_direct_expert_model_bypasses_routing(client, axis):
    out = client.post("/v1/chat/completions", json=body(HARM, model=f"expert-{axis.value}")).json()
    assert out["alignx"]["axis"] == axis.value and out["alignx"]["routed"] is False
    assert out["alignx"]["weights"] == {} and out["model"] == f"expert-{axis.value}"


def test_sampling_params_reach_the_expert(client):
    client.post("/v1/chat/completions",
                json=body(HONEST, max_tokens=9, temperature=0.3, top_p=0.5, stop=["x", "y"]))
    req = client.experts[Axis.HONESTY].calls[-1]
    assert (req.max_tokens, req.temperature, req.top_p, req.stop) == (9, 0.3, 0.5, ["x", "y"])
    client.post("/v1/chat/completions", json=body(HONEST, stop="z"))
    assert client.experts[Axis.HONESTY].calls[-1].stop == ["z"]


def test_models_route_healthz(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["alignx", "expert-helpfulness", "expert-harmlessness", "expert-honesty"]
    r = client.post("/v1/route", json={"messages": [{"role": "user", "content": HONEST}]})
    assert r.status_code == 200 and r.json()["alignx"]["axis"] == "honesty"
    assert sum(len(e.calls) for e in client.experts.values()) == 0  # routing only
    assert client.get("/healthz").json()["status"] == "ok"


def test_router_reads_last_user_message_only(client):
    msgs = [{"role": "system", "content": "weapon weapon weapon"},
            {"role": "user", "content": HARM}, {"role": "assistant", "content": "no"},
            {"role": "user", "content": HONEST}]
    out = client.post("/v1/chat/completions", json={"model": "alignx", "messages": msgs}).json()
    assert out["alignx"]["axis"] == "honesty"
    assert client.experts[Axis.HONESTY].calls[-1].messages == msgs  # whole conversation


# ----------------------------------------------------------------------------- streaming


def _events(text: str) -> list[str]:
    assert text.endswith("\n\n")
    return [e.removeprefix("data: ") for e in text.strip().split("\n\n")]


def test_streaming_sse_format(client):
    with client.stream("POST", "/v1/chat/completions", json=body(HONEST, stream=True)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = _events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[0]["alignx"]["axis"] == "honesty"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text.strip() == f"honesty: {HONEST}"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    assert chunks[-1]["alignx"]["adapter"] == "honesty"


# ----------------------------------------------------------------------------- bad input


def _assert_error(r, status: int, type_: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if type_:
        assert err["type"] == type_
    return err


BAD_BODIES = {
    "malformed json": b'{"model": "alignx", "messages": [',
    "not an object": b'["alignx"]',
    "empty body": b"",
    "missing model": json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(),
    "missing messages": json.dumps({"model": "alignx"}).encode(),
    "messages wrong type": json.dumps({"model": "alignx", "messages": "hi"}).encode(),
    "message content wrong type": json.dumps(
        {"model": "alignx", "messages": [{"role": "user", "content": 5}]}).encode(),
    "unknown role": json.dumps(
        {"model": "alignx", "messages": [{"role": "wizard", "content": "x"}]}).encode(),
    "empty messages": json.dumps({"model": "alignx", "messages": []}).encode(),
    "no user message": json.dumps(
        {"model": "alignx", "messages": [{"role": "system", "content": "x"}]}).encode(),
    "model wrong type": json.dumps({**body(), "model": 3}).encode(),
    "temperature too high": json.dumps(body(temperature=2.5)).encode(),
    "temperature negative": json.dumps(body(temperature=-0.1)).encode(),
    "temperature wrong type": json.dumps(body(temperature="hot")).encode(),
    "top_p zero": json.dumps(body(top_p=0)).encode(),
    "top_p above one": json.dumps(body(top_p=1.5)).encode(),
    "max_tokens zero": json.dumps(body(max_tokens=0)).encode(),
    "max_tokens over limit": json.dumps(body(max_tokens=100000)).encode(),
    "max_tokens wrong type": json.dumps(body(max_tokens="many")).encode(),
    "n > 1": json.dumps(body(n=2)).encode(),
    "stop wrong type": json.dumps(body(stop=5)).encode(),
    "stop empty string": json.dumps(body(stop="")).encode(),
    "stream wrong type": json.dumps(body(stream="yes please")).encode(),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_input_is_400_with_openai_error(client, name):
    r = client.post("/v1/chat/completions", content=BAD_BODIES[name],
                    headers={"content-type": "application/json"})
    _assert_error(r, 400, "invalid_request_error")
    assert sum(len(e.calls) for e in client.experts.values()) == 0


@pytest.mark.parametrize("model", ["gpt-4", "expert-wisdom", "expert-", "ALIGNX"])
def test_unknown_model_is_404(client, model):
    err = _assert_error(client.post("/v1/chat/completions", json=body(model=model)), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"


def test_unknown_path_and_method_are_openai_errors(client):
    _assert_error(client.get("/v1/nope"), 404)
    _assert_error(client.get("/v1/chat/completions"), 405)


def test_bad_route_body(client):
    _assert_error(client.post("/v1/route", content=b"{", headers={"content-type": "x"}), 400)
    _assert_error(client.post("/v1/route", json={"messages": []}), 400)


def test_prompt_over_token_limit_is_400(tiny_tokenizer):
    router, experts, _ = make_router(tokenizer=tiny_tokenizer, max_prompt_tokens=40)
    c = TestClient(build_router_api(router), raise_server_exceptions=False)
    err = _assert_error(c.post("/v1/chat/completions", json=body(HARM + " word" * 200)), 400)
    assert err["code"] == "context_length_exceeded"
    assert sum(len(e.calls) for e in experts.values()) == 0
    assert c.post("/v1/chat/completions", json=body(HARM)).status_code == 200


def test_expert_side_prompt_too_long_is_400():
    router, _, _ = make_router(fail=PromptTooLongError("prompt has 999 tokens"))
    c = TestClient(build_router_api(router), raise_server_exceptions=False)
    err = _assert_error(c.post("/v1/chat/completions", json=body()), 400)
    assert "999" in err["message"]
    err = _assert_error(c.post("/v1/chat/completions", json=body(stream=True)), 400)


class ReplicaGone(RuntimeError):
    """Stands in for Ray's ActorDiedError (the replica's node was lost mid-request)."""


def test_a_replica_lost_mid_request_is_503_not_500():
    router, _, metrics = make_router(fail=ReplicaGone("actor died"))
    c = TestClient(build_router_api(router), raise_server_exceptions=False)
    err = _assert_error(c.post("/v1/chat/completions", json=body()), 503, "server_error")
    assert err["code"] == "replica_unavailable"
    assert "retry" in err["message"]
    _assert_error(c.post("/v1/chat/completions", json=body(stream=True)), 503)
    assert metrics.records[-1]["status"] == 503


def test_overload_is_503():
    router, _, metrics = make_router(fail=Overloaded("queue full"))
    c = TestClient(build_router_api(router), raise_server_exceptions=False)
    _assert_error(c.post("/v1/chat/completions", json=body()), 503, "overloaded_error")
    _assert_error(c.post("/v1/chat/completions", json=body(stream=True)), 503)
    assert metrics.records[-1]["status"] == 503


# ----------------------------------------------------------------------------- auth


def test_bearer_auth():
    router, _, _ = make_router(api_key="s3cret")
    c = TestClient(build_router_api(router), raise_server_exceptions=False)
    _assert_error(c.post("/v1/chat/completions", json=body()), 401, "authentication_error")
    _assert_error(c.post("/v1/chat/completions", json=body(),
                         headers={"Authorization": "Bearer nope"}), 401)
    _assert_error(c.get("/v1/models"), 401)
    _assert_error(c.post("/v1/chat/completions", content=b"{",
                         headers={"Authorization": "Basic s3cret"}), 401)  # auth before parsing
    ok = c.post("/v1/chat/completions", json=body(), headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert c.get("/healthz").status_code == 200  # health checks stay open


def test_router_refuses_mismatched_encoder():
    class Other(rf.KeywordEncoder):
        id = "sentence:all-MiniLM-L6-v2"

    with pytest.raises(ValueError, match="calibrated on"):
        AlignXRouter({a: FakeExpert(a.value) for a in Axis}, rf.KeywordRouting(), Other())


def test_expert_only_server_has_no_alignx_model():
    router = AlignXRouter({Axis.HONESTY: FakeExpert("honesty")})
    c = TestClient(build_router_api(router), raise_server_exceptions=False)
    assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["expert-honesty"]
    _assert_error(c.post("/v1/chat/completions", json=body()), 404)
    assert c.post("/v1/chat/completions", json=body(model="expert-honesty")).status_code == 200


def test_one_json_log_line_per_request_without_prompt(client, caplog):
    caplog.set_level("INFO", logger="alignx.serve.router")
    client.post("/v1/chat/completions", json=body(HONEST))
    lines = [json.loads(r.message) for r in caplog.records if "alignx.request" in r.message]
    assert len(lines) == 1
    assert lines[0]["axis"] == "honesty" and lines[0]["status"] == 200
    assert "messages" not in lines[0] and HONEST not in json.dumps(lines[0])


def test_a_routing_model_with_its_own_feature_function_gets_what_it_computes():
    """A calibrated router with an OOD detector reads one more layer of the encoder's forward
    pass: the ingress encodes with ``routing_model.features(encoder)``, not ``encode``."""

    class WideRouting(rf.KeywordRouting):
        def __init__(self):
            self.seen = []

        def features(self, encoder):
            def fn(texts):
                h = encoder.encode(texts)
                return np.concatenate([h, np.full((len(h), 1), 7.0, np.float32)], axis=1)
            return fn

        def route(self, features):
            self.seen.append(features.shape)
            return super().route(features[:, :-1])

    routing = WideRouting()
    enc = rf.KeywordEncoder()
    router = AlignXRouter({a: FakeExpert(a.value) for a in Axis}, routing, enc)
    out = TestClient(build_router_api(router)).post("/v1/chat/completions", json=body(HONEST))
    assert out.status_code == 200 and out.json()["alignx"]["axis"] == "honesty"
    assert routing.seen == [(1, enc.encode([HONEST]).shape[1] + 1)]
