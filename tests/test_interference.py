from __future__ import annotations

import numpy as np
import pytest
import torch

from alignx.config import ModelCfg
from alignx.interference import _own_axis_checks, answer_loss, format_table, task_vector_cosines
from alignx.modeling import load_base


def _adapter(tmp_path, name, seed, scale=1.0, r=4, alpha=8):
    from peft import LoraConfig, get_peft_model

    model, _ = load_base(ModelCfg(name="tiny-llama"))
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    out = tmp_path / name
    peft.save_pretrained(out)
    deltas = []
    for _, m in peft.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            a = m.lora_A["default"].weight
            b = m.lora_B["default"].weight
            deltas.append(((alpha / r) * (b @ a)).flatten())
    return out, torch.cat(deltas).detach()


def test_task_vector_cosines_match_brute_force(tmp_path):
    d1, v1 = _adapter(tmp_path, "a", 1)
    d2, v2 = _adapter(tmp_path, "b", 2)
    d3, _ = _adapter(tmp_path, "c", 1, scale=-1.0)  # B -> -B and A -> -A: same delta as "a"
    res = task_vector_cosines({"a": d1, "b": d2, "c": d3})
    m = np.array(res["matrix"])
    expect = float(torch.nn.functional.cosine_similarity(v1, v2, dim=0))
    assert m[0, 1] == pytest.approx(expect, abs=1e-3)
    assert m[0, 0] == pytest.approx(1.0) and m[0, 2] == pytest.approx(1.0, abs=1e-4)
    assert np.allclose(m, m.T)
    assert res["norms"]["a"] == pytest.approx(float(v1.norm()), rel=1e-4)
    assert res["modules"] == 4  # 2 layers x (q_proj, v_proj)


def test_answer_loss_counts_only_response_tokens():
    model, _ = load_base(ModelCfg(name="tiny-llama"))
    ids = torch.randint(5, 100, (1, 12))
    labels = ids.clone()
    labels[0, :8] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    logits = model(input_ids=ids).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    assert answer_loss(model, [batch]) == pytest.approx(float(nll[7:].mean()), rel=1e-5)


def test_own_axis_check_and_table():
    losses = {"plain": {"honesty": {"base": 2.0, "honesty": 1.0, "helpfulness": 1.5},
                        "helpfulness": {"base": 2.0, "honesty": 1.9, "helpfulness": 2.1}}}
    checks = _own_axis_checks(losses, ["honesty", "helpfulness"])
    assert checks == {"plain": {"honesty": True, "helpfulness": False}}
    table = format_table({"metric": "m", "answer_loss": losses, "own_axis_best": checks,
                          "task_vector_cosine": {"names": ["x"], "matrix": [[1.0]], "modules": 1}})
    assert "honesty=yes" in table and "helpfulness=NO" in table
