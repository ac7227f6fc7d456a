"""Fixtures of the evaluation tests: one MiniLM encoder per session, the fake judge."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 encoder (bundled weights, ~2 s to load), loaded once."""
    from alignx.eval.offline_judges import MiniLMEncoder

    enc = MiniLMEncoder()
    enc.encode(["warm up"])
    return enc


@pytest.fixture()
def fake_judge():
    from alignx.eval.judges import FakeJudge

    return FakeJudge()
