"""The torch-free numpy engine against transformers, on tiny models of every registry family."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alignx.serve.backend import HFBackend, SamplingParams
from alignx.serve.npengine import (
    ArchConfig,
    NumpyBackend,
    NumpyCausalLM,
    UnsupportedModelError,
    engine_arrays,
    load_engine_arrays,
    load_lora,
    read_safetensors,
    sample_next,
)

_spec = importlib.util.spec_from_file_location("serve_conftest", Path(__file__).with_name(
    "conftest.py"))
_conf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conf)

TEXTS = ["hi there", "What is the capital of France? Tell me more.", "Write a poem"]


def _sharpen(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw the random weights large enough that greedy decoding is not one repeated token
    (the registry's tiny models are initialised with std 0.02: near-uniform logits)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (0.6 if "embed" in name else 0.15))


def _tiny(name: str, tmp_path: Path, **config_overrides):
    """A sharpened tiny model of registry entry ``name`` saved to ``tmp_path``: (hf model,
    tokenizer, its directory)."""
    from transformers import AutoModelForCausalLM

    from alignx.config import ModelCfg
    from alignx.modeling import load_tokenizer, resolve_model_dir

    src = resolve_model_dir(name)
    cfg = json.loads((Path(src) / "config.json").read_text())
    cfg.update(config_overrides)
    from transformers import AutoConfig

    hf_cfg = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "model_type"},
                                  model_type=cfg["model_type"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    _sharpen(model)
    model.eval()
    out = tmp_path / name
    model.save_pretrained(out)
    tok = load_tokenizer(ModelCfg(name=name))
    tok.save_pretrained(out)
    return model, tok, out


def _prompts(tok, texts=TEXTS):
    return [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                    add_generation_prompt=True) for t in texts]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral", "tiny-gemma"])
def test_logits_match_transformers(name, tmp_path):
    model, tok, d = _tiny(name, tmp_path)
    cfg, arrays = load_engine_arrays(d)
    ids = tok(_prompts(tok)[1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = NumpyCausalLM(cfg, arrays).logits(ids)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma"])
def test_greedy_generation_matches_transformers(name, tmp_path):
    model, tok, d = _tiny(name, tmp_path)
    cfg, arrays = load_engine_arrays(d)
    hf = HFBackend(model, tok)
    npb = NumpyBackend(NumpyCausalLM(cfg, arrays), tok, eos_ids=sorted(hf.eos_ids))
    prompts = _prompts(tok)
    params = [SamplingParams(max_tokens=n) for n in (12, 5, 9)]
    want = hf.generate(prompts, params)
    assert len({c.text for c in want}) == 3  # the sharpened model says different things
    assert npb.generate(prompts, params) == want
    # a row that finishes early leaves the batch without changing the others
    assert [npb.generate([p], [sp])[0] for p, sp in zip(prompts, params, strict=True)] == want
    # a prefill in chunks of 3 tokens (through the KV cache) is the same computation
    npb.prefill_chunk = 3
    assert npb.generate(prompts, params) == want


def test_sliding_window_matches_mistral(tmp_path):
    model, tok, d = _tiny("tiny-mistral", tmp_path, sliding_window=4)
    cfg, arrays = load_engine_arrays(d)
    assert cfg.sliding_window == 4
    ids = tok(_prompts(tok)[1], add_special_tokens=False)["input_ids"]
    assert len(ids) > 8
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = NumpyCausalLM(cfg, arrays).logits(ids)
    np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max())
    full = NumpyCausalLM(ArchConfig(**{**cfg.__dict__, "sliding_window": None}), arrays)
    assert not np.allclose(full.logits(ids)[-1], ref[-1], atol=1e-3)  # the window matters


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_matches_peft(tmp_path, rslora):
    from peft import LoraConfig, get_peft_model

    model, tok, d = _tiny("tiny-llama", tmp_path)
    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(
        r=4, lora_alpha=16, use_rslora=rslora, init_lora_weights=False, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    peft.save_pretrained(tmp_path / "adapter")
    cfg, arrays = load_engine_arrays(d)
    lora = load_lora(tmp_path / "adapter")
    assert len(lora.layers) == 2 * 7
    ids = tok(_prompts(tok)[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = peft(torch.tensor([ids])).logits[0].numpy()
    base = NumpyCausalLM(cfg, arrays)
    got = base.with_lora(lora).logits(ids)
    np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max())
    assert not np.allclose(base.logits(ids), ref, atol=1e-2)  # the adapter changes the output
    assert base.with_lora(lora).w is base.w  # base weights shared, not copied


def test_adapters_and_models_it_cannot_run_are_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, _, d = _tiny("tiny-llama", tmp_path)
    dora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True,
                                            task_type="CAUSAL_LM"))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(UnsupportedModelError, match="use_dora"):
        load_lora(tmp_path / "dora")
    cfg = json.loads((d / "config.json").read_text())
    with pytest.raises(UnsupportedModelError, match="rope type 'llama3'"):
        ArchConfig.from_hf({**cfg, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(UnsupportedModelError, match="model_type 'qwen2'"):
        ArchConfig.from_hf({**cfg, "model_type": "qwen2"})
    with pytest.raises(UnsupportedModelError, match="attention_bias"):
        ArchConfig.from_hf({**cfg, "attention_bias": True})
    arch = ArchConfig.from_hf(cfg)
    tensors = read_safetensors(d / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="does not use"):
        engine_arrays(arch, {**tensors, "model.layers.0.self_attn.q_norm.weight": np.ones(4)})
    tensors.pop("model.norm.weight")
    with pytest.raises(UnsupportedModelError, match="model.norm.weight"):
        engine_arrays(arch, tensors)
    with pytest.raises(UnsupportedModelError, match="no local config.json"):
        load_engine_arrays(tmp_path / "nowhere")


def test_bf16_checkpoints_are_widened_exactly(tmp_path):
    from safetensors.torch import save_file

    t = torch.randn(5, 7).to(torch.bfloat16)
    save_file({"w": t, "h": t.half()}, tmp_path / "x.safetensors")
    got = read_safetensors(tmp_path / "x.safetensors")
    assert got["w"].dtype == np.float32
    np.testing.assert_array_equal(got["w"], t.float().numpy())
    np.testing.assert_array_equal(got["h"], t.half().float().numpy())


def test_sampling_rows_follow_their_own_settings():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.1, 0.2, 0.7]], np.float32))
    greedy = SamplingParams(temperature=0.0)
    nucleus = SamplingParams(temperature=1.0, top_p=0.5)  # only the top token holds 0.5
    wide = SamplingParams(temperature=1.0, top_p=0.85)  # tokens 0 and 1
    draws = np.stack([sample_next(logits, [greedy, nucleus, wide], rng) for _ in range(400)])
    assert (draws[:, 0] == 0).all()
    assert (draws[:, 1] == 0).all()
    assert set(draws[:, 2]) == {1, 2}
    assert 0.70 < (draws[:, 2] == 2).mean() < 0.85  # 0.7 / 0.9 renormalised = 0.78
    hot = np.stack([sample_next(logits[:1], [SamplingParams(temperature=1.0)], rng)
                    for _ in range(600)])[:, 0]
    assert abs((hot == 0).mean() - 0.5) < 0.07


@pytest.fixture(scope="module")
def np_backend(tiny_model_cfg):
    from alignx.serve.weights import numpy_base_loader

    model, tok = numpy_base_loader(tiny_model_cfg, shared=False)()
    return NumpyBackend(model, tok)


def test_stop_strings_and_stream_agree_with_generate(np_backend):
    p = _prompts(np_backend.tok)[1]
    free = np_backend.generate([p], [SamplingParams(max_tokens=12)])[0]
    assert len(free.text) > 4
    stop = free.text[2:4]
    cut = np_backend.generate([p], [SamplingParams(max_tokens=12, stop=(stop,))])[0]
    assert cut.text == free.text[: free.text.index(stop)]
    assert cut.finish_reason == "stop"
    sp = SamplingParams(max_tokens=12, stop=(stop,))
    items = list(np_backend.stream(p, sp))
    assert items[-1] == cut
    assert "".join(items[:-1]) == cut.text


def test_expert_on_numpy_engine_answers_like_the_torch_engine(tiny_model_cfg, tiny_run_dir):
    from alignx.axes import Axis
    from alignx.serve.expert import AxisExpert
    from alignx.serve.schemas import GenerateRequest
    from alignx.serve.weights import numpy_base_loader

    req = GenerateRequest(messages=[{"role": "user", "content": "Tell me about the sea"}],
                          max_tokens=6, temperature=0.0, top_p=1.0)
    np_exp = AxisExpert(Axis.HONESTY, tiny_run_dir, tiny_model_cfg,
                        base_loader=numpy_base_loader(tiny_model_cfg, shared=False))
    hf_exp = AxisExpert(Axis.HONESTY, tiny_run_dir, tiny_model_cfg)
    assert isinstance(np_exp._state.backend, NumpyBackend)
    assert isinstance(hf_exp._state.backend, HFBackend)
    a = asyncio.run(np_exp.generate(req))
    b = asyncio.run(hf_exp.generate(req))
    assert (a.text, a.completion_tokens, a.provenance) == (b.text, b.completion_tokens,
                                                           b.provenance)


def test_h3fusion_refuses_the_numpy_engine(tiny_model_cfg, tiny_run_dir):
    from alignx.baselines.systems import load_system
    from alignx.serve.weights import numpy_base_loader

    with pytest.raises(UnsupportedModelError, match="torch engine only"):
        load_system("h3fusion", tiny_run_dir, tiny_model_cfg,
                    numpy_base_loader(tiny_model_cfg, shared=False))


def test_choose_engine(tiny_model_cfg, tmp_path):
    from alignx.config import ModelCfg
    from alignx.serve.app import AppArgs, choose_engine

    assert choose_engine("auto", "helpfulness", tiny_model_cfg)[0] == "numpy"
    assert choose_engine("torch", "helpfulness", tiny_model_cfg)[0] == "torch"
    assert choose_engine("auto", "h3fusion", tiny_model_cfg) == (
        "torch", "engine: auto, h3fusion's token-level gates are torch modules")
    hub = ModelCfg(name=str(tmp_path / "not-a-local-model"))
    engine, why = choose_engine("auto", "helpfulness", hub)
    assert engine == "torch" and "no local config.json" in why
    with pytest.raises(UnsupportedModelError, match="use engine: torch or auto"):
        choose_engine("numpy", "helpfulness", hub)
    assert AppArgs(run_dir="r", model="tiny-llama").engine == "auto"
    with pytest.raises(ValueError, match="engine"):
        AppArgs(run_dir="r", model="tiny-llama", engine="vllm")


def test_numpy_expert_never_imports_torch(tiny_run_dir, repo_root):
    """The point of the engine: an expert replica's process loads no torch runtime."""
    code = f"""
import asyncio, sys
import alignx.serve.app  # what a Serve replica imports to unpickle its deployment
from alignx.axes import Axis
from alignx.config import ModelCfg
from alignx.serve.expert import AxisExpert
from alignx.serve.schemas import GenerateRequest
from alignx.serve.weights import numpy_base_loader
cfg = ModelCfg(name="tiny-llama")
exp = AxisExpert(Axis.HELPFULNESS, {str(tiny_run_dir)!r}, cfg,
                 base_loader=numpy_base_loader(cfg, shared=False))
r = asyncio.run(exp.generate(GenerateRequest(messages=[{{"role": "user", "content": "hi"}}],
                                             max_tokens=4, temperature=0.0, top_p=1.0)))
assert r.completion_tokens >= 1, r
heavy = [m for m in ("torch", "peft", "transformers.models.llama.modeling_llama")
         if m in sys.modules]
print("HEAVY", heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=repo_root, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HEAVY []" in out.stdout, out.stdout
