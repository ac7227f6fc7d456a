"""The H3Fusion-style gated LoRA mixture and the system loader on tiny-llama (CPU, no Ray)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from alignx.artifacts import (
    ArtifactLayout,
    ArtifactMismatchError,
    ArtifactNotFoundError,
    H3FusionManifest,
    write_bytes_atomic,
    write_json_atomic,
)
from alignx.axes import AXES, Axis
from alignx.baselines.h3fusion import (
    GATES_FILE,
    GatedLoraLinear,
    attach_gates,
    gate_state_dict,
    gated_modules,
    gates_to_bytes,
    h3fusion_dir,
    h3fusion_loss,
    load_expert_weights,
    load_gate_state,
    read_gates,
)
from alignx.baselines.systems import load_system, parse_system, union_system
from alignx.config import ModelCfg
from alignx.data.templates import get_template
from alignx.modeling import load_base

_spec = importlib.util.spec_from_file_location(
    "serve_conftest_baselines", Path(__file__).parents[1] / "serve" / "conftest.py")
_conf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conf)

CFG = ModelCfg(name="tiny-llama")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Three random (non-zero) axis adapters + a multi-task adapter, as Stage 1 leaves them."""
    root = _conf.make_run_dir(tmp_path_factory.mktemp("h3f-run"))
    layout = ArtifactLayout(root)
    shutil.copytree(layout.adapter_dir(Axis.HELPFULNESS), layout.adapter_dir("multitask"))
    m = layout.load_adapter_manifest(Axis.HELPFULNESS).model_copy(update={
        "name": "multitask", "axes": list(AXES),
        "template_ids": {a.value: f"{a.value}/v1" for a in AXES}})
    write_json_atomic(layout.adapter_manifest("multitask"), m)
    return root


def _gated(run_dir, top_k=None):
    base, tok = load_base(CFG)
    return attach_gates(base, load_expert_weights(run_dir, AXES, "tiny-llama"), top_k), tok


def _randomize_gates(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in gated_modules(model).values():
        m.gate.weight.data = torch.randn(m.gate.weight.shape, generator=g)
        m.gate.bias.data = torch.randn(m.gate.bias.shape, generator=g)


def _batch(tok, texts=("Give me three tips for staying healthy.", "Is the earth flat? No.")):
    enc = tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


# ----------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_gate_weights_sum_to_one_per_token(top_k):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 12)
    layer = GatedLoraLinear(lin, torch.randn(3, 4, 16), torch.randn(3, 12, 4),
                            torch.tensor([2.0, 2.0, 2.0]), top_k)
    torch.nn.init.normal_(layer.gate.weight)
    x = torch.randn(2, 5, 16)
    g = layer.gate_probs(x)  # (2, 5, 3)
    assert g.shape == (2, 5, 3)
    assert torch.allclose(g.sum(-1), torch.ones(2, 5), atol=1e-6)
    assert ((g > 0).sum(-1) == (top_k or 3)).all()
    assert layer(x).shape == (2, 5, 12)


def test_fresh_gates_are_uniform_and_only_gates_train(run_dir):
    model, _ = _gated(run_dir)
    layers = gated_modules(model)
    assert layers and all(isinstance(m.base, torch.nn.Linear) for m in layers.values())
    x = torch.randn(4, next(iter(layers.values())).base.in_features)
    assert torch.allclose(next(iter(layers.values())).gate_probs(x), torch.full((4, 3), 1 / 3))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.gate.{k}" for n in layers for k in ("weight", "bias")}


@pytest.mark.parametrize("expert", range(3))
def test_one_hot_gate_equals_the_single_expert_peft_model(run_dir, expert):
    from peft import PeftModel

    model, tok = _gated(run_dir)
    for m in gated_modules(model).values():  # softmax of (0, -1e4, -1e4): exactly one-hot
        m.gate.bias.data = torch.full((3,), -1e4)
        m.gate.bias.data[expert] = 0.0
    peft = PeftModel.from_pretrained(load_base(CFG)[0],
                                     str(ArtifactLayout(run_dir).adapter_dir(AXES[expert])))
    b = _batch(tok)
    with torch.no_grad():
        ours = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        ref = peft(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        plain = load_base(CFG)[0](input_ids=b["input_ids"],
                                  attention_mask=b["attention_mask"]).logits
    assert not torch.allclose(ref, plain, atol=1e-4)  # the expert does change the output
    assert torch.allclose(ours, ref, atol=1e-5)


def test_gates_train_and_the_loss_goes_down(run_dir):
    model, tok = _gated(run_dir)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    experts = {n: m.lora_a.clone() for n, m in gated_modules(model).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    b = _batch(tok)
    losses = []
    for _ in range(12):
        loss, lm, bal = h3fusion_loss(model, b, balance_coef=0.01)
        assert 1.0 - 1e-5 <= bal <= 3.0 + 1e-5
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(lm)
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(torch.equal(m.lora_a, experts[n]) for n, m in gated_modules(model).items())
    assert all(m.last_probs is None and not m.record for m in gated_modules(model).values())


def test_generate_with_kv_cache_matches_without(run_dir):
    model, tok = _gated(run_dir)
    _randomize_gates(model)
    enc = tok(["Tell me a fact about the sea."], return_tensors="pt", add_special_tokens=False)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        cached = model.generate(**enc, use_cache=True, **kw)
        uncached = model.generate(**enc, use_cache=False, **kw)
    assert torch.equal(cached, uncached) and cached.shape[1] > enc["input_ids"].shape[1]


def test_gate_save_load_round_trip(run_dir, tmp_path):
    model, tok = _gated(run_dir)
    _randomize_gates(model, seed=3)
    path = write_bytes_atomic(tmp_path / GATES_FILE, gates_to_bytes(gate_state_dict(model), AXES))
    fresh, _ = _gated(run_dir)
    load_gate_state(fresh, read_gates(path))
    b = _batch(tok)
    with torch.no_grad():
        assert torch.equal(model(**b).logits, fresh(**b).logits)
    state = read_gates(path)
    state.pop(next(iter(state)))
    with pytest.raises(ValueError, match="missing"):
        load_gate_state(fresh, state)
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="unreadable"):
        read_gates(tmp_path / "bad.safetensors")


def test_expert_weights_check_their_artifacts(run_dir, tmp_path):
    with pytest.raises(ArtifactNotFoundError, match="alignx train"):
        load_expert_weights(tmp_path, AXES, "tiny-llama")
    with pytest.raises(ArtifactMismatchError, match="tiny-mistral"):
        load_expert_weights(run_dir, AXES, "tiny-mistral")
    w = load_expert_weights(run_dir, AXES, "tiny-llama")
    assert w.axes == tuple(AXES) and set(w.manifests) == {a.value for a in AXES}
    a, b = next(iter(w.modules.values()))
    assert a.shape[0] == b.shape[0] == 3 and torch.allclose(w.scaling, torch.full((3,), 2.0))


# ----------------------------------------------------------------------------- systems


def _publish_gates(run_dir, model, experts_sha):
    system_id, system = union_system({a.value: f"{a.value}/v1" for a in AXES}, AXES)
    out = h3fusion_dir(run_dir)
    write_bytes_atomic(out / GATES_FILE, gates_to_bytes(gate_state_dict(model), AXES))
    write_json_atomic(out / "manifest.json", H3FusionManifest(
        axes=list(AXES), base_model="tiny-llama", experts=experts_sha, system=system,
        template_id=system_id, gate_top_k=None, balance_coef=0.0,
        gated_modules=len(gated_modules(model)), gate_params=0, steps=0, lr=1e-3,
        micro_batch_size=2, train_tokens=0, train_loss=None, train_seconds=0.0,
        config_hash="test"))


def test_union_system_names_every_axis_template():
    sid, text = union_system({a.value: f"{a.value}/v1" for a in AXES}, AXES)
    assert sid == "union:helpfulness/v1+harmlessness/v1+honesty/v1"
    assert all(get_template(f"{a.value}/v1").system in text for a in AXES)
    assert union_system({a.value: "none" for a in AXES}, AXES) == ("none", None)
    with pytest.raises(ValueError, match="honesty"):
        union_system({"helpfulness": "helpfulness/v1"}, AXES)


def test_parse_system():
    assert parse_system("base") == "base" and parse_system("expert-honesty") == "expert-honesty"
    for bad in ("alignx", "expert-kindness", "gpt4"):
        with pytest.raises(ValueError, match="valid"):
            parse_system(bad)


def test_load_system_base_multitask_expert(run_dir):
    msgs = [{"role": "user", "content": "hello"}]
    base = load_system("base", run_dir, CFG)
    assert base.system is None and base.messages(msgs) == msgs
    assert base.provenance.adapter == "base" and base.provenance.run == str(Path(run_dir))
    mt = load_system("multitask", run_dir, CFG)
    assert mt.template_id.startswith("union:") and mt.messages(msgs)[0]["role"] == "system"
    assert get_template("honesty/v1").system in mt.prompt(msgs)
    ex = load_system("expert-honesty", run_dir, CFG.model_dump())
    assert ex.system == get_template("honesty/v1").system and ex.provenance.adapter == "honesty"
    with torch.no_grad():  # forward gives logits (what log-likelihood scoring needs)
        ids = ex.tokenizer(ex.prompt(msgs), return_tensors="pt", add_special_tokens=False)
        assert ex.model(**ids).logits.shape[:2] == ids["input_ids"].shape


def test_load_system_h3fusion_and_stale_gates(run_dir, tmp_path):
    with pytest.raises(ArtifactNotFoundError, match="h3fusion"):
        load_system("h3fusion", run_dir, CFG)
    model, tok = _gated(run_dir)
    _randomize_gates(model, seed=5)
    w = load_expert_weights(run_dir, AXES, "tiny-llama")
    _publish_gates(run_dir, model, w.manifests)
    try:
        sys_ = load_system("h3fusion", run_dir, CFG)
        assert sys_.template_id.startswith("union:") and sys_.provenance.adapter == "h3fusion"
        b = _batch(tok)
        with torch.no_grad():
            assert torch.equal(sys_.model(**b).logits, model(**b).logits)
        stale = {**w.manifests, "honesty": "0" * 16}
        _publish_gates(run_dir, model, stale)
        with pytest.raises(ArtifactMismatchError, match="retrain"):
            load_system("h3fusion", run_dir, CFG)
    finally:
        shutil.rmtree(h3fusion_dir(run_dir))
