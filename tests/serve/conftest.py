"""Fixtures of the serve tests: the tiny-llama tokenizer/model (built in-process)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_cfg():
    from alignx.config import ModelCfg

    return ModelCfg(name="tiny-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_cfg):
    from alignx.modeling import load_tokenizer

    return load_tokenizer(tiny_model_cfg)


def make_run_dir(root, model_name: str = "tiny-llama", seed: int = 0):
    """A run directory with one random (non-zero) LoRA adapter + manifest per axis, made with
    PEFT directly (as the training stage would leave it)."""
    from pathlib import Path

    import torch
    from peft import LoraConfig, get_peft_model

    from alignx.artifacts import AdapterManifest, ArtifactLayout, write_json_atomic
    from alignx.axes import AXES
    from alignx.config import ModelCfg
    from alignx.data.templates import DEFAULT_TEMPLATE_IDS
    from alignx.modeling import load_base

    layout = ArtifactLayout(Path(root))
    for i, axis in enumerate(AXES):
        base, _ = load_base(ModelCfg(name=model_name))
        torch.manual_seed(seed * 10 + i)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False, task_type="CAUSAL_LM")
        model = get_peft_model(base, lora)
        model.save_pretrained(layout.adapter_dir(axis))
        write_json_atomic(layout.adapter_manifest(axis), AdapterManifest(
            name=axis.value, axes=[axis], base_model=model_name,
            template_ids={axis.value: DEFAULT_TEMPLATE_IDS[axis]}, data_hash="test",
            lora={"rank": 4}, zero_stage=2, num_workers=1, steps=0, train_tokens=0,
            train_loss=None, tokens_per_s=None, train_seconds=0.0, config_hash=f"seed{seed}"))
    return layout.root


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("run-a"))
