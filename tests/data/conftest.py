"""Shared fixtures of the data tests: fixture paths and the tiny models' tokenizers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DATA_DIR = (
    FIXTURES  # the fixture folder is itself a data directory (jobs/configs/tiny.yaml uses it)
)
UPSTREAM_DIR = FIXTURES / "upstream"

os.environ.setdefault("ALIGNX_CACHE_DIR", "/tmp/axcache")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def upstream_dir() -> Path:
    return UPSTREAM_DIR


TINY_MODELS = ("tiny-llama", "tiny-gemma", "tiny-mistral")


@pytest.fixture(scope="session", params=TINY_MODELS)
def tokenizer(request):
    """The tokenizer (with its registry chat template) of each tiny model, built offline."""
    from alignx.config import ModelCfg
    from alignx.modeling import load_tokenizer

    return load_tokenizer(ModelCfg(name=request.param))
