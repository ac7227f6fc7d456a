"""AxisExpert's generation loop (no Ray): requests queued while the model is busy are merged
into the next batch, up to ``max_batch_size``; failures and cancellations stay per batch."""

from __future__ import annotations

import asyncio
import threading

import pytest

from alignx.axes import Axis
from alignx.serve.backend import Completion
from alignx.serve.expert import AxisExpert, _ExpertState
from alignx.serve.schemas import GenerateRequest, Provenance


class GatedBackend:
    """Records the size of every generate call; blocks while ``gate`` is clear."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = False

    def count_tokens(self, prompt: str) -> int:
        return len(prompt.split())

    def generate(self, prompts, params):
        assert self.gate.wait(30)
        self.calls.append(len(prompts))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("generation failed")
        return [Completion(f"answer {i}", "length", 3, p.max_tokens)
                for i, p in enumerate(params)]


@pytest.fixture
def expert(tiny_tokenizer):
    backend = GatedBackend()
    state = _ExpertState(backend, tiny_tokenizer, "Be honest.", "honesty/v1",
                         Provenance(run="/runs/a", adapter="honesty", manifest_sha256="x",
                                    created_at="now"))
    ex = AxisExpert(Axis.HONESTY, "/runs/a", {"name": "tiny-llama"}, state=state)
    return ex, backend


def _req(max_tokens: int = 4) -> GenerateRequest:
    return GenerateRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens,
                           temperature=0.0, top_p=1.0)


async def _while_busy(ex: AxisExpert, backend: GatedBackend, n: int, cancel: int = 0):
    """Start one request, block the model on it, queue ``n`` single requests (cancelling the
    first ``cancel`` of them), then let the model go."""
    backend.gate.clear()
    first = asyncio.create_task(ex.generate_batch([_req()]))
    for _ in range(50):  # until the first batch is inside the backend
        await asyncio.sleep(0.01)
        if ex._gen_queue is not None and not ex._gen_queue:
            break
    rest = [asyncio.create_task(ex.generate_batch([_req(max_tokens=i + 1)])) for i in range(n)]
    await asyncio.sleep(0.05)
    for t in rest[:cancel]:
        t.cancel()
    await asyncio.sleep(0)
    backend.gate.set()
    out = await asyncio.gather(first, *rest, return_exceptions=True)
    return out[0], out[1:]


def test_requests_queued_while_busy_run_as_one_batch(expert):
    ex, backend = expert
    first, rest = asyncio.run(_while_busy(ex, backend, 5))
    assert backend.calls == [1, 5]
    assert [r[0].completion_tokens for r in rest] == [1, 2, 3, 4, 5]  # each its own result
    assert all(r[0].provenance.adapter == "honesty" for r in rest)


def test_merged_batches_are_capped_at_max_batch_size(expert):
    ex, backend = expert
    ex.max_batch_size = 3
    asyncio.run(_while_busy(ex, backend, 7))
    assert backend.calls == [1, 3, 3, 1]


def test_cancelled_requests_are_not_generated(expert):
    ex, backend = expert
    _, rest = asyncio.run(_while_busy(ex, backend, 3, cancel=2))
    assert backend.calls == [1, 1]
    assert all(isinstance(r, asyncio.CancelledError) for r in rest[:2])
    assert rest[2][0].completion_tokens == 3


def test_a_failed_batch_fails_only_its_requests(expert):
    ex, backend = expert

    async def scenario():
        backend.fail_next = True
        with pytest.raises(RuntimeError, match="generation failed"):
            await ex.generate_batch([_req(), _req()])
        return await ex.generate_batch([_req()])

    after = asyncio.run(scenario())
    assert backend.calls == [2, 1] and after[0].text == "answer 0"
