"""CoalescingEncoder: concurrent routing requests share one encode call, results stay matched."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from alignx.serve.router import CoalescingEncoder


class SlowEncoder:
    """Features = [len(text), call index]; each call blocks until released (thread-safe)."""

    def __init__(self):
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.started = threading.Event()

    def encode(self, texts):
        self.batches.append(list(texts))
        self.started.set()
        self.release.wait(5)
        return np.array([[len(t), len(self.batches)] for t in texts], dtype=np.float32)


def test_a_lone_request_is_encoded_at_once():
    enc = SlowEncoder()
    enc.release.set()
    b = CoalescingEncoder(enc.encode)
    out = asyncio.run(b.encode("hello"))
    assert out.shape == (1, 2) and out[0, 0] == 5
    assert enc.batches == [["hello"]]


def test_requests_arriving_during_an_encode_share_the_next_call():
    async def main():
        enc = SlowEncoder()
        b = CoalescingEncoder(enc.encode)
        first = asyncio.ensure_future(b.encode("a"))
        await asyncio.to_thread(enc.started.wait, 5)  # "a" is being encoded
        rest = [asyncio.ensure_future(b.encode("x" * n)) for n in range(2, 7)]
        await asyncio.sleep(0.05)
        enc.release.set()
        return enc, await first, await asyncio.gather(*rest)

    enc, first, rest = asyncio.run(main())
    assert enc.batches == [["a"], ["xx", "xxx", "xxxx", "xxxxx", "xxxxxx"]]
    assert first[0].tolist() == [1, 1]
    assert [r[0].tolist() for r in rest] == [[n, 2] for n in range(2, 7)]  # each its own row


def test_batches_are_capped_at_max_batch():
    async def main():
        enc = SlowEncoder()
        b = CoalescingEncoder(enc.encode, max_batch=2)
        futs = [asyncio.ensure_future(b.encode(str(i))) for i in range(5)]
        await asyncio.sleep(0)
        enc.release.set()
        return enc, await asyncio.gather(*futs)

    enc, outs = asyncio.run(main())
    assert [len(x) for x in enc.batches] == [2, 2, 1]
    assert [o.shape for o in outs] == [(1, 2)] * 5


def test_an_encoder_error_reaches_every_request_of_its_batch_and_the_next_batch_still_runs():
    calls = []

    def encode(texts):
        calls.append(list(texts))
        if "bad" in texts:
            raise RuntimeError("tokenizer exploded")
        return np.ones((len(texts), 3))

    async def main():
        b = CoalescingEncoder(encode)
        futs = [asyncio.ensure_future(b.encode(t)) for t in ("bad", "ok")]
        res = await asyncio.gather(*futs, return_exceptions=True)
        after = await b.encode("later")
        return res, after

    res, after = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in res)
    assert after.shape == (1, 3)
    assert calls[-1] == ["later"]


def test_a_wrong_row_count_is_an_error_not_a_misassignment():
    async def main():
        b = CoalescingEncoder(lambda texts: np.ones((1, 3)))
        return await asyncio.gather(b.encode("a"), b.encode("b"), return_exceptions=True)

    res = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "2 texts" in str(r) for r in res)


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError, match="max_batch"):
        CoalescingEncoder(lambda t: t, max_batch=0)
