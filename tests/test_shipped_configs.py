"""Every shipped config validates, so configs cannot drift from code."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignx.config import load_config
from alignx.models import REGISTRY, TINY_STANDIN

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))
PAPER = ["mistral7b", "gemma7b", "deepseek7b", "llama2_7b"]


def test_expected_configs_ship():
    names = {p.stem for p in CONFIGS}
    assert {"tiny", "smollm2_cpu", *PAPER} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_validates_and_names_a_registry_model(path):
    cfg = load_config(path)
    assert cfg.model.name in REGISTRY
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), "each YAML begins with a comment saying what uses it"


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_are_gpu_bf16_zero2(name):
    cfg = load_config(Path(CONFIGS[0]).parent / f"{name}.yaml")
    assert cfg.model.name == name and cfg.model.dtype == "bfloat16"
    assert cfg.train.deepspeed.zero_stage == 2 and cfg.train.scaling.use_gpu
    # paper hyperparameters: AdamW lr 2e-5, global batch 64, weight decay 0.01, 3 epochs
    o, s = cfg.train.optim, cfg.train.scaling
    assert o.lr == pytest.approx(2e-5) and o.weight_decay == 0.01 and o.epochs == 3
    assert o.micro_batch_size * o.grad_accum * s.num_workers == 64
    assert TINY_STANDIN[name] in REGISTRY


@pytest.mark.parametrize("name", ["tiny", "smollm2_cpu"])
def test_cpu_configs_fit_three_trainers_on_two_cores(name):
    cfg = load_config(Path(CONFIGS[0]).parent / f"{name}.yaml")
    s = cfg.train.scaling
    assert not s.use_gpu and cfg.train.deepspeed.torch_adam
    assert 3 * s.num_workers * s.cpus_per_worker <= 2.0
