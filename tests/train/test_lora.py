"""LoRA wiring on the tiny model, in plain torch (no Ray, no DeepSpeed): what trains, what
stays frozen, and that the loss can fall."""

from __future__ import annotations

import pytest
import torch

from alignx.config import LoraCfg, ModelCfg
from alignx.data.tokenize import collate, encode_sft
from alignx.models import get_spec
from alignx.train.lora import build_lora_config

TINY = ModelCfg(name="tiny-llama", max_seq_len=128)


def test_targets_default_to_the_registry() -> None:
    cfg = build_lora_config(LoraCfg(rank=4, alpha=8, dropout=0.0), "tiny-llama")
    assert set(cfg.target_modules) == set(get_spec("tiny-llama").lora_targets)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (4, 8, 0.0)
    assert cfg.task_type == "CAUSAL_LM"


def test_explicit_targets_win() -> None:
    cfg = build_lora_config(LoraCfg(target_modules=["q_proj", "v_proj"]), "tiny-llama")
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}


def test_unknown_model_needs_targets() -> None:
    with pytest.raises(ValueError, match="train.lora.target_modules"):
        build_lora_config(LoraCfg(), "/some/local/model")
    assert build_lora_config(LoraCfg(target_modules=["c_attn"]), "/some/local/model")


def _peft_model_and_batch():
    from peft import get_peft_model

    from alignx.modeling import load_base

    model, tok = load_base(TINY, use_gpu=False)
    torch.manual_seed(0)
    model = get_peft_model(
        model, build_lora_config(LoraCfg(rank=4, alpha=8, dropout=0.0), TINY.name)
    )
    model.train()
    examples = [
        encode_sft(
            [{"role": "user", "content": f"Question {i}: is the sky green?"}],
            "I have no comment.",
            tok,
            TINY.max_seq_len,
        )
        for i in range(4)
    ]
    return model, collate(examples, tok.pad_token_id)


def test_lora_params_change_base_params_do_not() -> None:
    model, batch = _peft_model_and_batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    # Two steps: LoRA's B starts at zero, so A receives no gradient until B has moved once.
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), f"LoRA parameter {n} has not changed"
        else:
            assert torch.equal(p, before[n]), f"frozen parameter {n} has changed"


def test_loss_falls_when_overfitting_one_batch() -> None:
    model, batch = _peft_model_and_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(40):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # Only the attention LoRA of a random 2-layer model learns, so the fall is steady, not steep.
    assert losses[-1] < 0.9 * losses[0], losses
    assert sum(losses[-5:]) < sum(losses[:5]), losses
