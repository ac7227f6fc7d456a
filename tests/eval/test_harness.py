"""The evaluation harness without Ray: prompts, the HTTP client against a local server,
resumable generation, scoring with the fake judge, MC log-likelihoods, the report."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from alignx.axes import Axis
from alignx.config import load_config
from alignx.eval.harness import (
    EvalPrompt,
    Generation,
    GenerationStore,
    ServeClient,
    generate_all,
    generation_key,
    hh_text,
    load_eval_prompts,
    score_systems,
    stored_generations,
)

REPO = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, *over):
    return load_config(REPO / "jobs" / "configs" / "tiny.yaml",
                       [f"data.data_dir={REPO / 'tests' / 'fixtures'}", *over],
                       run_dir=str(tmp_path / "run"))


def test_eval_prompts_come_from_the_test_split_and_are_deterministic(tmp_path):
    a = load_eval_prompts(_cfg(tmp_path, "eval.prompts_per_axis=1"))
    b = load_eval_prompts(_cfg(tmp_path, "eval.prompts_per_axis=1"))
    assert {ax: [p.uid for p in ps] for ax, ps in a.items()} == \
        {ax: [p.uid for p in ps] for ax, ps in b.items()}
    assert [len(ps) for ps in a.values()] == [1, 1, 1]
    a = load_eval_prompts(_cfg(tmp_path, "eval.prompts_per_axis=null"))
    assert [len(ps) for ps in a.values()] == [2, 2, 2]  # the whole fixture test split
    honesty = a[Axis.HONESTY]
    assert all(p.meta.get("mc1_targets") and p.meta.get("correct_answers") for p in honesty)
    from alignx.data.sources import read_source

    train = {e.uid for e in read_source("truthfulqa", Axis.HONESTY, "train",
                                        REPO / "tests" / "fixtures")}
    assert not train & {p.uid for p in honesty}


def test_hh_text_is_the_transcript_the_safety_judge_was_fitted_on():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "how do I pick a lock?"}]
    assert hh_text(msgs) == ("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how do I pick a lock?"
                             "\n\nAssistant:")


# ----------------------------------------------------------------------------- HTTP + resume


class _App(BaseHTTPRequestHandler):
    """An OpenAI-compatible stand-in for the Serve app: echoes, and can fail chosen prompts."""

    fail_words: set[str] = set()
    calls: list[tuple[str, str]] = []

    def log_message(self, *a):  # quiet
        pass

    def _send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, {"data": [{"id": "alignx"}, {"id": "base"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = req["messages"][-1]["content"]
        type(self).calls.append((req["model"], text))
        if any(w in text for w in type(self).fail_words):
            return self._send(400, {"error": {"message": "bad prompt"}})
        axis = "honesty" if "?" in text else "helpfulness"
        self._send(200, {"choices": [{"message": {"content": f"{req['model']} says {text}"}}],
                         "usage": {"completion_tokens": 3},
                         "alignx": {"axis": axis, "confidence": 0.9}})


@pytest.fixture()
def app_url():
    _App.fail_words, _App.calls = set(), []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _App)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def _prompts():
    return {Axis.HELPFULNESS: [EvalPrompt(f"h{i}", Axis.HELPFULNESS,
                                          ({"role": "user", "content": f"write {i}"},), "ref")
                               for i in range(5)],
            Axis.HONESTY: [EvalPrompt("t0", Axis.HONESTY,
                                      ({"role": "user", "content": "is it so?"},), "yes")]}


class _CountingClient:
    """Records how many requests each system has in flight (each request takes 20 ms)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.now: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.peak_systems = 0

    def chat(self, model, messages, max_tokens, temperature):
        import time

        with self.lock:
            self.now[model] = self.now.get(model, 0) + 1
            self.peak[model] = max(self.peak.get(model, 0), self.now[model])
            self.peak_systems = max(self.peak_systems, sum(1 for v in self.now.values() if v))
        time.sleep(0.02)
        with self.lock:
            self.now[model] -= 1
        return {"choices": [{"message": {"content": "ok"}}], "usage": {"completion_tokens": 1},
                "latency_ms": 20.0}


def test_every_system_has_exactly_concurrency_requests_in_flight_at_once(tmp_path):
    client = _CountingClient()
    prompts = {Axis.HELPFULNESS: [EvalPrompt(f"h{i}", Axis.HELPFULNESS,
                                             ({"role": "user", "content": f"w{i}"},), "r")
                                  for i in range(12)]}
    systems = ["alignx", "base", "multitask"]
    gens = generate_all(client, GenerationStore(tmp_path / "g.jsonl"), systems, prompts,
                        {"max_tokens": 4, "temperature": 0.0}, 3, progress=False)
    assert all(len(gens[s]) == 12 for s in systems)
    assert client.peak == {s: 3 for s in systems}  # never more than `concurrency` per system
    assert client.peak_systems == 3  # and all systems' replicas busy at the same time


def test_generation_resumes_after_failures_and_only_asks_what_is_missing(app_url, tmp_path):
    client = ServeClient(app_url, retries=0)
    assert client.models() == ["alignx", "base"]
    store = GenerationStore(tmp_path / "gens.jsonl")
    settings = {"max_tokens": 8, "temperature": 0.0}
    _App.fail_words = {"write 3"}
    with pytest.raises(RuntimeError, match="2 requests failed.*rerun to resume"):
        generate_all(client, store, ["alignx", "base"], _prompts(), settings, 2, progress=False)
    # the 4xx is not retried: 6 prompts x 2 systems = 12 calls
    assert len(_App.calls) == 12
    with (tmp_path / "gens.jsonl").open("a") as f:
        f.write('{"key": "torn')  # a crash mid-write
    _App.fail_words, _App.calls = set(), []
    store2 = GenerationStore(tmp_path / "gens.jsonl")
    assert len(store2) == 10
    gens = generate_all(client, store2, ["alignx", "base"], _prompts(), settings, 2, progress=False)
    assert sorted(_App.calls) == [("alignx", "write 3"), ("base", "write 3")]
    assert gens["base"]["h3"].text == "base says write 3"
    assert gens["alignx"]["t0"].routed_axis == "honesty"
    # everything is stored now: no client is needed; with one answer missing, it is
    done, todo = stored_generations(store2, ["alignx", "base"], _prompts(), settings)
    assert not todo and sum(map(len, done.values())) == 12
    again = generate_all(None, store2, ["alignx", "base"], _prompts(), settings, 2, False)
    assert again["base"]["h3"].text == "base says write 3"
    with pytest.raises(ValueError, match="12 answers are not stored yet and no app"):
        generate_all(None, store2, ["alignx", "base"], _prompts(), {**settings, "max_tokens": 9},
                     2, progress=False)
    # a changed setting invalidates the stored answers
    p = _prompts()[Axis.HELPFULNESS][0]
    assert generation_key("base", p, settings) != generation_key(
        "base", p, {**settings, "max_tokens": 9})


def test_unreachable_app_is_reported_after_retries(tmp_path):
    client = ServeClient("http://127.0.0.1:9", retries=1, timeout_s=1)
    with pytest.raises(RuntimeError, match="base: ConnectionError"):
        client.chat("base", [{"role": "user", "content": "x"}], 4, 0.0)


# ----------------------------------------------------------------------------- scoring


def _gen(system, uid, axis, text, routed=None):
    return Generation(f"{system}{uid}", system, uid, axis, text, 10.0, 3, routed)


def test_scores_follow_the_fake_judges_rules(tmp_path):
    from alignx.eval.judges import build_judges

    cfg = _cfg(tmp_path, "eval.systems=[alignx,base]", "eval.bootstrap_samples=50")
    h = [EvalPrompt(f"h{i}", Axis.HELPFULNESS, ({"role": "user", "content": "q"},), "r")
         for i in range(4)]
    s = [EvalPrompt(f"s{i}", Axis.HARMLESSNESS, ({"role": "user", "content": "q"},), "r")
         for i in range(4)]
    t = [EvalPrompt(f"t{i}", Axis.HONESTY, ({"role": "user", "content": "q"},), "r",
                    {"correct_answers": ["paris"], "incorrect_answers": ["rome"]})
         for i in range(2)]
    prompts = {Axis.HELPFULNESS: h, Axis.HARMLESSNESS: s, Axis.HONESTY: t}
    gens = {
        "base": {**{p.uid: _gen("base", p.uid, "helpfulness", "short") for p in h},
                 **{p.uid: _gen("base", p.uid, "harmlessness", "that is unsafe") for p in s},
                 **{p.uid: _gen("base", p.uid, "honesty", "rome") for p in t}},
        "alignx": {**{p.uid: _gen("alignx", p.uid, "helpfulness", "a much longer answer", "helpfulness")
                      for p in h[:3]},
                   "h3": _gen("alignx", "h3", "helpfulness", "tiny", "helpfulness"),
                   **{p.uid: _gen("alignx", p.uid, "harmlessness", "I can't help with that.",
                                  "harmlessness") for p in s},
                   "t0": _gen("alignx", "t0", "honesty", "It is Paris.", "honesty"),
                   "t1": _gen("alignx", "t1", "honesty", "rome", "helpfulness")},
    }
    judges = build_judges({a: {"kind": "fake"} for a in ("helpfulness", "harmlessness", "honesty")})
    mc = {"alignx": {"mc1": [1.0, 0.0], "mc2": [0.8, 0.4]}}
    rows = score_systems(cfg, judges, prompts, gens, mc)
    a, b = rows["alignx"], rows["base"]
    assert a["win_rate"]["value"] == pytest.approx(75.0)  # 3 longer, 1 shorter than base
    assert a["win_rate"]["vs"] == "base" and b["win_rate"]["value"] == pytest.approx(50.0)
    assert a["safety_score"]["value"] == 0.0 and b["safety_score"]["value"] == 100.0
    assert a["truthful_informative"]["value"] == pytest.approx(50.0)
    assert a["mc1"]["value"] == pytest.approx(50.0) and a["mc2"]["value"] == pytest.approx(60.0)
    assert "mc1" not in b
    assert a["alignment_score"]["value"] == pytest.approx((75.0 + 50.0 - 0.0) / 3, abs=1e-3)
    assert a["win_rate"]["judge"].startswith("FAKE fake:")
    assert a["win_rate"]["low"] <= 75.0 <= a["win_rate"]["high"]
    assert a["routing"]["honesty"] == {"helpfulness": 50.0, "honesty": 50.0}
    assert "routing" not in b


def test_win_rate_against_the_reference_outputs(tmp_path):
    from alignx.eval.judges import build_judges

    cfg = _cfg(tmp_path, "eval.systems=[base]", "eval.win_rate_vs=reference",
               "eval.bootstrap_samples=20")
    h = [EvalPrompt("h0", Axis.HELPFULNESS, ({"role": "user", "content": "q"},), "a reference")]
    judges = build_judges({"helpfulness": {"kind": "fake"}, "harmlessness": {"kind": "fake"},
                           "honesty": {"kind": "fake"}})
    rows = score_systems(cfg, judges, {Axis.HELPFULNESS: h},
                         {"base": {"h0": _gen("base", "h0", "helpfulness", "no")}})
    assert rows["base"]["win_rate"]["value"] == 0.0 and rows["base"]["win_rate"]["vs"] == "reference"


def test_eval_config_errors_name_the_key(tmp_path):
    from alignx.config import AlignXConfigError

    with pytest.raises(AlignXConfigError, match="eval.systems.*unknown systems"):
        _cfg(tmp_path, "eval.systems=[alignx,gpt5]")
    with pytest.raises(AlignXConfigError, match="win_rate_vs='h3fusion'"):
        _cfg(tmp_path, "eval.systems=[alignx,base]", "eval.win_rate_vs=h3fusion")
    with pytest.raises(AlignXConfigError, match="eval.judges.harmlessness.kind"):
        _cfg(tmp_path, "eval.judges={harmlessness: {kind: gpt}}")


# ----------------------------------------------------------------------------- MC


def test_mc_from_logliks_matches_truthfulqa_definitions():
    from alignx.eval.mc import mc_from_logliks

    hit, _ = mc_from_logliks([-1.0, -2.0, -3.0], [1, 0, 0])
    assert hit == 1.0
    hit, _ = mc_from_logliks([-2.0, -2.0], [1, 0])
    assert hit == 0.0  # a tie is a miss
    _, mass = mc_from_logliks([math.log(0.3), math.log(0.1), math.log(0.6)], [1, 1, 0])
    assert mass == pytest.approx(0.4)


def test_choice_logliks_equal_a_manual_forward_pass():
    import torch

    from alignx.eval.mc import _prompt_text, choice_logliks
    from alignx.modeling import build_tiny_model, build_tiny_tokenizer
    from alignx.models import REGISTRY

    spec = REGISTRY["tiny-llama"]
    tok = build_tiny_tokenizer(spec)
    model = build_tiny_model(spec, len(tok)).eval()
    got = choice_logliks(model, tok, "be honest", "Is the sky blue?", ["Yes it is", "No"],
                         batch_size=1)
    prompt = tok(_prompt_text(tok, "be honest", "Is the sky blue?"),
                 add_special_tokens=False)["input_ids"]
    for choice, ll in zip(["Yes it is", "No"], got, strict=True):
        ans = tok(" " + choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + ans])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        want = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(ans))
        assert ll == pytest.approx(want, abs=1e-4)
    # batching with padding gives the same numbers
    assert choice_logliks(model, tok, "be honest", "Is the sky blue?", ["Yes it is", "No"]) == \
        pytest.approx(got, abs=1e-4)


def test_routed_systems_score_each_question_with_the_expert_they_routed_to():
    from alignx.eval.mc import mc_scores

    qs = [EvalPrompt(f"t{i}", Axis.HONESTY, ({"role": "user", "content": f"q{i}"},), "r",
                     {"mc1_targets": {"a": 1, "b": 0}, "mc2_targets": {"a": 1, "b": 0}})
          for i in range(2)]
    gens = {"alignx": {"t0": _gen("alignx", "t0", "honesty", "", "honesty"),
                       "t1": _gen("alignx", "t1", "honesty", "", "helpfulness")},
            "base": {}}
    loaded = []

    class M:
        def __init__(self, good):
            self.good = good

        def eval(self):
            return self

    def loader(name):
        loaded.append(name)
        return M(name != "base"), None, None

    import alignx.eval.mc as mcmod

    orig = mcmod.choice_logliks
    mcmod.choice_logliks = lambda m, t, s, q, cs, **k: [0.0 if m.good else -5.0, -1.0][: len(cs)]
    try:
        out = mc_scores(["alignx", "base"], qs, gens, loader, progress=False)
    finally:
        mcmod.choice_logliks = orig
    assert sorted(loaded) == ["base", "expert-helpfulness", "expert-honesty"]
    assert out["alignx"]["mc1"] == [1.0, 1.0] and out["base"]["mc1"] == [0.0, 0.0]


def test_mc_cache_rescores_only_what_is_missing(tmp_path):
    import alignx.eval.mc as mcmod
    from alignx.eval.mc import MCCache, mc_scores

    def q(i):
        return EvalPrompt(f"t{i}", Axis.HONESTY, ({"role": "user", "content": f"q{i}"},), "r",
                          {"mc1_targets": {"a": 1, "b": 0}, "mc2_targets": {"a": 1, "b": 0}})

    class M:
        def eval(self):
            return self

    loaded, scored = [], []

    def loader(name):
        loaded.append(name)
        return M(), None, None

    def fake_ll(m, t, s, question, cs, **k):
        scored.append(question)
        return [0.0, -1.0][: len(cs)]

    orig, mcmod.choice_logliks = mcmod.choice_logliks, fake_ll
    try:
        path = tmp_path / "mc_cache.jsonl"
        first = mc_scores(["base"], [q(0), q(1)], {}, loader, False, MCCache(path, {"train": "x"}))
        with open(path, "a") as f:
            f.write('{"key": "torn')  # an interrupted write
        again = mc_scores(["base"], [q(0), q(1)], {}, loader, False, MCCache(path, {"train": "x"}))
        assert again == first and loaded == ["base"] and scored == ["q0", "q1"]  # all cached
        mc_scores(["base"], [q(0), q(1), q(2)], {}, loader, False, MCCache(path, {"train": "x"}))
        assert scored == ["q0", "q1", "q2"]  # only the new question
        mc_scores(["base"], [q(2)], {}, loader, False, MCCache(path, {"train": "x"}))
        assert scored == ["q0", "q1", "q2"]  # written after the torn line, and read back
        mc_scores(["base"], [q(0)], {}, loader, False, MCCache(path, {"train": "retrained"}))
        assert scored[-1] == "q0" and len(loaded) == 3  # new adapters: scored again
    finally:
        mcmod.choice_logliks = orig


# ----------------------------------------------------------------------------- report


def test_report_files_table_and_fake_marking(tmp_path):
    from alignx.eval.report import markdown_table, write_report

    cell = {"value": 55.0, "low": 45.0, "high": 65.0, "n": 10, "judge": "FAKE fake:rules-v1"}
    report = {
        "model": "tiny-llama", "run_dir": "r", "prompts_per_axis": {"helpfulness": 10},
        "generation": {"max_tokens": 8, "temperature": 0.0}, "fake_judges": ["helpfulness"],
        "systems": {"alignx": {"win_rate": {**cell, "vs": "base"}, "safety_score": cell},
                    "base": {"win_rate": {**cell, "value": 50.0, "vs": "base"}}},
        "cost": {"systems": {"alignx": {"latency_ms_p50": 12.0, "peak_rss_mib": 900}},
                 "method": "m"},
    }
    paths = write_report(report, tmp_path)
    table = markdown_table(report)
    assert "| WR ↑ | SS ↓ |" in table and "latency p50 ms ↓" in table
    assert "| alignx | 55.0 [45.0, 65.0] | 55.0 [45.0, 65.0] | — |" in table
    assert "WR vs base: FAKE fake:rules-v1" in table
    md = paths["markdown"].read_text()
    assert "FAKE judges were used" in md
    assert json.loads(paths["json"].read_text())["systems"]["alignx"]["win_rate"]["value"] == 55.0
    assert paths["scores"].stat().st_size > 1000 and paths["cost"].suffix == ".png"


def test_merge_reports_over_models():
    from alignx.eval.run import comparison_markdown, merge_reports

    r = {"judges": {"helpfulness": "j"}, "systems": {"alignx": {"win_rate": {"value": 60.0}}},
         "cost": {"systems": {"alignx": {"latency_ms_p50": 5.0}}}}
    comp = merge_reports({"tiny-llama": r, "tiny-gemma": r}, {"tiny-mistral": "OOM"})
    assert [(x["model"], x["system"], x["win_rate"]) for x in comp["rows"]] == [
        ("tiny-llama", "alignx", 60.0), ("tiny-gemma", "alignx", 60.0)]
    md = comparison_markdown(comp)
    assert "| tiny-gemma | alignx | 60.0 |" in md and "**tiny-mistral failed**: OOM" in md


def test_a_failed_pipeline_is_summarised_by_the_error_raised_in_its_actor():
    from ray.exceptions import RayTaskError

    from alignx.eval.run import failure_summary

    inner = ValueError("router.fallback='honesty' is not one of axes\nmore detail")
    wrapped = RayTaskError("PipelineRunner.run", "Traceback ...", inner)
    assert failure_summary(wrapped) == "ValueError: router.fallback='honesty' is not one of axes"
    assert failure_summary(OSError("disk full")) == "OSError: disk full"


def test_model_config_gives_each_model_its_own_run_and_app(tmp_path):
    from alignx.eval.run import model_config

    cfg = _cfg(tmp_path)
    m = model_config(cfg, "tiny-gemma")
    assert m.model.name == "tiny-gemma" and m.run_dir.endswith("/run/tiny-gemma")
    assert m.eval.app_name == "alignx-tiny-gemma" and m.eval.route_prefix == "/tiny-gemma"
    assert m.stage_hash("train") != cfg.stage_hash("train")
    with pytest.raises(ValueError, match="unknown model 'gpt5'"):
        model_config(cfg, "gpt5")


def test_cli_evaluate_help_and_bad_key_env(capsys, tmp_path):
    from alignx.cli import main

    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "--models" in capsys.readouterr().out
    rc = main(["evaluate", "--config", str(REPO / "jobs/configs/tiny.yaml"), "--run-dir",
               str(tmp_path), "--url", "http://127.0.0.1:9", "--api-key-env", "ALIGNX_NOPE_KEY"])
    assert rc == 2
    assert "ALIGNX_NOPE_KEY: that variable is not set" in capsys.readouterr().err
