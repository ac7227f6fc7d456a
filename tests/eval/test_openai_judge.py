"""OpenAIJudge against a fake OpenAI-compatible server on 127.0.0.1 (no real network)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alignx.eval.judges import (
    JudgeResponseError,
    OpenAIJudge,
    PairwiseItem,
    SafetyItem,
    TruthItem,
    parse_pairwise_reply,
    parse_safety_reply,
    parse_truth_reply,
)


class FakeServer:
    """Answers ``POST /v1/chat/completions`` with ``reply(user_message)``; a reply that is an
    ``int`` is sent as that HTTP status instead. Records each request."""

    def __init__(self, reply: Callable[[str], str | int]) -> None:
        self.reply = reply
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
                )
                out = server.reply(body["messages"][-1]["content"])
                if isinstance(out, int):
                    data, status = b'{"error": {"message": "boom"}}', out
                else:
                    data, status = (
                        json.dumps(
                            {
                                "id": "c1",
                                "object": "chat.completion",
                                "created": 0,
                                "model": body["model"],
                                "choices": [
                                    {
                                        "index": 0,
                                        "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": out},
                                    }
                                ],
                            }
                        ).encode(),
                        200,
                    )
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def serve():
    servers = []

    def start(reply):
        s = FakeServer(reply)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def _judge(server: FakeServer, monkeypatch, **kw) -> OpenAIJudge:
    monkeypatch.setenv("ALIGNX_TEST_JUDGE_KEY", "sk-local")
    return OpenAIJudge(
        "judge-model", server.url, "ALIGNX_TEST_JUDGE_KEY", backoff_s=0.0, concurrency=1, **kw
    )


def test_pairwise_verdicts_survive_position_randomisation(serve, monkeypatch):
    # The fake judge prefers whichever output contains GOOD, wherever it is shown.
    def reply(user: str) -> str:
        a = re.search(r"## Output \(a\):\n(.*?)\n\n## Output \(b\)", user, re.S).group(1)
        return "Output (a)" if "GOOD" in a else "Output (b)"

    server = serve(reply)
    judge = _judge(server, monkeypatch)
    items = [
        PairwiseItem(f"task {i}", f"GOOD answer {i}", f"meh answer {i}", "ref") for i in range(6)
    ]
    swapped = [PairwiseItem(it.prompt, it.answer_b, it.answer_a, it.reference) for it in items]
    assert judge.judge_pairwise(items) == [1.0] * 6
    assert judge.judge_pairwise(swapped) == [0.0] * 6
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-local"
    assert req["body"]["model"] == "judge-model" and req["body"]["temperature"] == 0
    assert "not one of the outputs" in req["body"]["messages"][-1]["content"]  # reference shown
    assert judge.judge_id == f"openai:judge-model@{server.url}"


def test_safety_and_truth_replies_are_parsed(serve, monkeypatch):
    def reply(user: str) -> str:
        if "[Assistant reply]" in user:
            return '```json\n{"unsafe": true, "refusal": false, "score": 0.9}\n```'
        return "True: yes\nHelpful: no"

    judge = _judge(serve(reply), monkeypatch)
    [s] = judge.judge_safety([SafetyItem("how to x", "do y")])
    assert (s.unsafe, s.score, s.refusal, s.judge_id) == (True, 0.9, False, judge.judge_id)
    [t] = judge.judge_truthful([TruthItem("q?", "I have no comment.", ["a"], ["b"])])
    assert (t.truthful, t.informative) == (True, False)


def test_malformed_reply_is_retried_then_succeeds(serve, monkeypatch):
    replies = iter(["I think both are nice.", 500, "Output (b)"])
    server = serve(lambda _: next(replies))
    judge = _judge(server, monkeypatch, max_retries=2)
    item = PairwiseItem("p", "same", "same")  # equal answers: the verdict maps back either way
    out = judge.judge_pairwise([item])
    assert out in ([0.0], [1.0]) and len(server.requests) == 3 and judge.calls == 3


def test_persistently_malformed_reply_raises_a_clear_error(serve, monkeypatch):
    server = serve(lambda _: "The reply looks harmless to me")
    judge = _judge(server, monkeypatch, max_retries=1)
    with pytest.raises(JudgeResponseError) as e:
        judge.judge_safety([SafetyItem("p", "a")])
    msg = str(e.value)
    assert "openai:judge-model" in msg and "2 attempts" in msg and "looks harmless" in msg
    assert len(server.requests) == 2


def test_missing_key_env_fails_early(monkeypatch):
    monkeypatch.delenv("ALIGNX_TEST_NO_KEY", raising=False)
    with pytest.raises(ValueError, match="ALIGNX_TEST_NO_KEY"):
        OpenAIJudge("gpt-4", "http://127.0.0.1:9/v1", "ALIGNX_TEST_NO_KEY")
    assert (
        OpenAIJudge("local", "http://127.0.0.1:9/v1", None).judge_id
        == "openai:local@http://127.0.0.1:9/v1"
    )


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Output (a)", 1.0),
        ("output (b)\n\nBecause Output (a) rambles.", 0.0),
        ("Tie", 0.5),
        ("(b)", 0.0),
        ("**Output (a)**", 1.0),
    ],
)
def test_parse_pairwise(text, expected):
    assert parse_pairwise_reply(text) == expected


@pytest.mark.parametrize("text", ["", "Output (a) and Output (b) are equal", "I like a lot"])
def test_parse_pairwise_rejects_ambiguous(text):
    with pytest.raises(JudgeResponseError):
        parse_pairwise_reply(text)


def test_parse_safety_and_truth():
    assert parse_safety_reply('{"unsafe": false, "refusal": true}') == (False, 0.0, True)
    assert parse_safety_reply("unsafe\nS1") == (True, 1.0, False)
    assert parse_safety_reply('{"unsafe": true, "score": 7}') == (True, 1.0, False)
    with pytest.raises(JudgeResponseError):
        parse_safety_reply('{"unsafe": "maybe"}')
    assert parse_truth_reply("True: no\nHelpful: yes") == (False, True)
    with pytest.raises(JudgeResponseError, match="Helpful"):
        parse_truth_reply("True: yes")
