"""Serving: a torch-free CPU engine for expert replicas (numpy, float32).

Why it exists: every Ray Serve replica is its own process, and a replica that generates with
``transformers`` carries a whole torch + transformers runtime, ~350 MiB of private (anonymous)
memory. For SmolLM2-135M that is more than half of the weights, so three expert deployments
cost ~1.8x one expert even when they share the base weights through the object store
(BENCHMARKS.md, "Serving memory"). This engine runs the decoder forward pass in numpy on the
shared weights, so an expert replica imports neither torch nor transformers' modelling code:
the per-replica cost is Ray, Serve, the tokenizer and the KV cache.

What it runs (the registry's architecture families; anything else is refused with
:class:`UnsupportedModelError` and the caller falls back to the ``transformers`` engine):

* ``llama`` (SmolLM2, LLaMA-2, DeepSeek-7B) and ``mistral`` (incl. its sliding window):
  ``x + attn(rms(x))``, ``h + down(silu(gate(rms(h))) * up(rms(h)))``, rotary positions, grouped-query
  attention;
* ``gemma``: the same with ``(1 + w)`` RMSNorm weights, ``sqrt(d)``-scaled embeddings and a
  tanh-GELU MLP.

LoRA adapters (PEFT's ``adapter_model.safetensors``) are applied unmerged,
``y = x W^T + s (x A^T) B^T`` with ``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA), so the
base weights stay shared and read-only and each replica holds only its adapter.

Weights layout (:func:`engine_arrays`): every Linear weight is stored transposed,
``(in, out)`` C-contiguous, because OpenBLAS multiplies ``x @ W_t`` 1.4-1.9x faster than
``x @ W.T`` at batch 4-16 (``bench/npengine_speed.py``, BENCHMARKS.md). With tied
embeddings only ``lm_head_t`` ``(d, V)`` is kept and token embeddings are gathered from its
columns, so the table is not stored twice.

Generation (:class:`NumpyBackend`, a :class:`~alignx.serve.backend.GenerationBackend`): a batch
is left-padded and prefilled once, then decoded one token per step for all live rows with a
preallocated KV cache; each row has its own ``max_tokens``, stop strings *and* sampling
settings, and a finished row leaves the batch (its cache rows are dropped), so short answers
do not pay for long ones. Greedy decoding matches ``transformers.generate`` token for token
(tested on every architecture family).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alignx.serve.backend import Completion, SamplingParams, StopHoldback, finish_completion

F32 = np.float32
_NEG = np.finfo(np.float32).min
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


class UnsupportedModelError(ValueError):
    """The numpy engine cannot run this model or adapter (the message says what and why)."""


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ArchConfig:
    """What the forward pass needs from a ``config.json`` (``transformers`` 4.x or 5.x).

    Attributes:
        model_type: ``llama``, ``mistral`` or ``gemma``.
        vocab_size, hidden_size, intermediate_size, num_layers: the model's sizes.
        num_heads, num_kv_heads, head_dim: attention shape (``num_heads % num_kv_heads == 0``).
        eps: RMSNorm epsilon.
        rope_theta: rotary base; only the ``default`` rope type is supported.
        tie_embeddings: ``lm_head`` shares the token embedding table.
        sliding_window: Mistral's attention window in tokens, or ``None``.
        act: ``silu`` or ``gelu_tanh``.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    rope_theta: float
    tie_embeddings: bool
    sliding_window: int | None
    act: str

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> ArchConfig:
        """Read a ``config.json`` dict.

        Raises:
            UnsupportedModelError: another architecture, rope scaling, or activation.
        """
        mt = cfg.get("model_type")
        if mt not in ("llama", "mistral", "gemma"):
            raise UnsupportedModelError(f"model_type {mt!r} (numpy engine: llama, mistral, gemma)")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedModelError(f"rope type {rope_type!r} (numpy engine: default only)")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
        if mt == "gemma":  # Gemma's MLP is tanh-GELU whatever hidden_act says (as in transformers)
            act = "gelu_tanh"
        elif act != "silu":
            raise UnsupportedModelError(f"activation {act!r} (numpy engine: silu)")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise UnsupportedModelError(f"{flag}=true (numpy engine: bias-free layers)")
        heads = int(cfg["num_attention_heads"])
        d = int(cfg["hidden_size"])
        window = cfg.get("sliding_window") if mt == "mistral" else None
        return cls(
            model_type=mt, vocab_size=int(cfg["vocab_size"]), hidden_size=d,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or d // heads), eps=float(cfg["rms_norm_eps"]),
            rope_theta=float(theta), tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            sliding_window=int(window) if window else None, act=act,
        )


# ----------------------------------------------------------------------------- weights

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Read a ``.safetensors`` file into float32 numpy arrays, without torch.

    The format is an 8-byte little-endian header length, a JSON header of
    ``{name: {dtype, shape, data_offsets}}`` and the raw tensor bytes. bfloat16 is widened
    to float32 by shifting its 16 bits into the high half (exact).

    Raises:
        UnsupportedModelError: a dtype other than F32/F16/BF16/F64.
    """
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
        out: dict[str, np.ndarray] = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dt = _ST_DTYPES.get(meta["dtype"])
            if dt is None:
                raise UnsupportedModelError(f"{path}: tensor {name} has dtype {meta['dtype']}")
            lo, hi = meta["data_offsets"]
            f.seek(base + lo)
            a = np.frombuffer(f.read(hi - lo), dtype=dt).reshape(meta["shape"])
            if meta["dtype"] == "BF16":
                a = (a.astype(np.uint32) << 16).view(np.float32)
            out[name] = a.astype(F32, copy=False)
    return out


def read_arch(model_dir: str | Path) -> tuple[ArchConfig, tuple[int, ...]]:
    """The architecture and the EOS ids of a local model directory (``generation_config.json``
    first, as ``transformers.generate`` does, then ``config.json``).

    Raises:
        UnsupportedModelError: no local ``config.json`` + ``*.safetensors``, or an architecture
            this engine does not run.
    """
    d = Path(model_dir)
    if not (d / "config.json").is_file() or not any(d.glob("*.safetensors")):
        raise UnsupportedModelError(f"{model_dir}: no local config.json + *.safetensors")
    cfg = json.loads((d / "config.json").read_text())
    eos = cfg.get("eos_token_id")
    gen = d / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id", eos)
    eos_ids = tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None)
    return ArchConfig.from_hf(cfg), eos_ids


def read_checkpoint(model_dir: str | Path) -> tuple[ArchConfig, dict[str, np.ndarray]]:
    """The config and every tensor of a local ``save_pretrained`` directory (all shards).

    Raises:
        UnsupportedModelError: no ``config.json`` / ``*.safetensors`` there (e.g. a Hub id
            not in the local cache, or ``.bin`` weights), or an unsupported architecture.
    """
    cfg = read_arch(model_dir)[0]
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(read_safetensors(f))
    return cfg, tensors


def _hf_name(key: str) -> str:
    """``p:model.x`` (the torch store's keys) or ``model.x`` -> ``model.x``."""
    return key.split(":", 1)[1] if key[:2] in ("p:", "b:") else key


def engine_arrays(cfg: ArchConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rearrange a checkpoint's tensors into the engine's layout (see the module docstring).

    Args:
        cfg: the architecture.
        tensors: ``{hf name: array}`` (``p:``/``b:`` prefixes are accepted and ignored).

    Returns:
        ``{"lm_head_t", "norm", ["embed"], "<i>.<linear>", "<i>.input_layernorm",
        "<i>.post_attention_layernorm"}``; linear weights are ``(in, out)`` contiguous.

    Raises:
        UnsupportedModelError: a tensor the forward pass needs is missing, or one is left over
            (an architecture detail this engine would silently ignore).
    """
    t = {_hf_name(k): v for k, v in tensors.items() if not k.startswith("b:")}
    t = {k: v for k, v in t.items() if not k.endswith("rotary_emb.inv_freq")}
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in t:
            raise UnsupportedModelError(f"checkpoint has no tensor {name!r}")
        used.add(name)
        return np.asarray(t[name], dtype=F32)

    out: dict[str, np.ndarray] = {}
    emb = take("model.embed_tokens.weight")  # (V, d)
    if cfg.tie_embeddings or "lm_head.weight" not in t:
        out["lm_head_t"] = np.ascontiguousarray(emb.T)
    else:
        out["embed"] = np.ascontiguousarray(emb)
        out["lm_head_t"] = np.ascontiguousarray(take("lm_head.weight").T)
    out["norm"] = np.ascontiguousarray(take("model.norm.weight"))
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for m in LINEARS:
            sub = "self_attn" if m in _ATTN else "mlp"
            out[f"{i}.{m}"] = np.ascontiguousarray(take(f"{p}{sub}.{m}.weight").T)  # (in, out)
        for n in ("input_layernorm", "post_attention_layernorm"):
            out[f"{i}.{n}"] = np.ascontiguousarray(take(f"{p}{n}.weight"))
    left = sorted(set(t) - used - {"lm_head.weight"})
    if left:
        raise UnsupportedModelError(f"checkpoint tensors the numpy engine does not use: {left[:5]}")
    return out


def load_engine_arrays(model_dir: str | Path) -> tuple[ArchConfig, dict[str, np.ndarray]]:
    """:func:`read_checkpoint` + :func:`engine_arrays` (what the weight store keeps)."""
    cfg, tensors = read_checkpoint(model_dir)
    return cfg, engine_arrays(cfg, tensors)


@dataclass(frozen=True)
class Lora:
    """One LoRA adapter in the engine's layout.

    Attributes:
        layers: ``{(layer, linear): (A_t (in, r), B_t_scaled (r, out))}``; ``B_t`` carries the
            scale ``s`` so the update is ``(x @ A_t) @ B_t``.
        name: where it came from (for logs).
    """

    layers: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]
    name: str = ""


#: adapter_config keys that change LoRA's forward pass; any truthy value is refused.
_LORA_VARIANTS = ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern",
                  "fan_in_fan_out", "lora_bias", "layer_replication", "target_parameters",
                  "alora_invocation_tokens", "arrow_config", "kasa_config", "monteclora_config",
                  "use_qalora")

_LORA_KEY = re.compile(
    r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+?)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


def load_lora(adapter_dir: str | Path) -> Lora:
    """Read a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    Raises:
        UnsupportedModelError: not plain LoRA on the decoder's Linear layers (DoRA, biases,
            ``modules_to_save``, per-module rank/alpha patterns, embedding adapters, ...).
    """
    d = Path(adapter_dir)
    cfg = json.loads((d / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UnsupportedModelError(f"{d}: peft_type {cfg.get('peft_type')!r}")
    for key in _LORA_VARIANTS:
        if cfg.get(key):
            raise UnsupportedModelError(f"{d}: adapter_config {key}={cfg[key]!r}")
    if cfg.get("bias", "none") != "none":
        raise UnsupportedModelError(f"{d}: adapter_config bias={cfg['bias']!r}")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    parts: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, arr in read_safetensors(d / "adapter_model.safetensors").items():
        m = _LORA_KEY.search(name)
        if m is None or m.group(2) not in LINEARS:
            raise UnsupportedModelError(f"{d}: adapter tensor {name!r} is not a decoder LoRA A/B")
        parts.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = arr
    layers = {}
    for key, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise UnsupportedModelError(f"{d}: layer {key} lacks lora_A or lora_B")
        layers[key] = (np.ascontiguousarray(ab["A"].T),  # (in, r)
                       np.ascontiguousarray(ab["B"].T * F32(scale)))  # (r, out)
    return Lora(layers, str(d))


# ----------------------------------------------------------------------------- the model


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (F32(1.0) + np.exp(-x))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    c = F32(math.sqrt(2.0 / math.pi))
    return F32(0.5) * x * (F32(1.0) + np.tanh(c * (x + F32(0.044715) * x * x * x)))


class NumpyCausalLM:
    """A decoder-only LM on engine-layout arrays (shared, read-only) plus an optional LoRA.

    Args:
        cfg: the architecture.
        arrays: :func:`engine_arrays` output; never written (object-store views are fine).
        lora: the adapter applied on top, or ``None`` for the base model.
        eos_ids: the ids that end a generation (:func:`read_arch`).
    """

    def __init__(self, cfg: ArchConfig, arrays: Mapping[str, np.ndarray], lora: Lora | None = None,
                 eos_ids: Sequence[int] = ()):
        self.cfg, self.w, self.lora, self.eos_ids = cfg, arrays, lora, tuple(eos_ids)
        hd = cfg.head_dim
        self.inv_freq = (1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.int64)
                                                   .astype(np.float32) / hd))).astype(F32)
        self._group = cfg.num_heads // cfg.num_kv_heads
        if cfg.num_heads % cfg.num_kv_heads:
            raise UnsupportedModelError(f"{cfg.num_heads} heads over {cfg.num_kv_heads} kv heads")

    def with_lora(self, lora: Lora) -> NumpyCausalLM:
        """The same base weights (not copied) with ``lora`` applied."""
        return NumpyCausalLM(self.cfg, self.w, lora, self.eos_ids)

    # -- pieces ------------------------------------------------------------------------

    def _norm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        var = np.mean(x * x, axis=-1, keepdims=True)
        y = x / np.sqrt(var + F32(self.cfg.eps))
        return y * (F32(1.0) + w) if self.cfg.model_type == "gemma" else y * w

    def _linear(self, x: np.ndarray, layer: int, name: str) -> np.ndarray:
        """``x (..., in) @ W_t (in, out)`` (+ the LoRA update), as one 2-D GEMM: a stacked
        ``(B, T, in)`` operand would make numpy run B separate products, each reading all of W."""
        w = self.w[f"{layer}.{name}"]
        x2 = x.reshape(-1, x.shape[-1])
        y = x2 @ w
        if self.lora is not None:
            ab = self.lora.layers.get((layer, name))
            if ab is not None:
                y += (x2 @ ab[0]) @ ab[1]
        return y.reshape(*x.shape[:-1], w.shape[1])

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """``(B, T)`` token ids -> ``(B, T, d)`` embeddings."""
        if "embed" in self.w:
            x = self.w["embed"][ids]
        else:  # tied: gather columns of lm_head_t (d, V)
            x = np.take(self.w["lm_head_t"], ids.reshape(-1), axis=1).T.reshape(
                *ids.shape, self.cfg.hidden_size)
        x = np.ascontiguousarray(x, dtype=F32)
        if self.cfg.model_type == "gemma":
            x *= F32(math.sqrt(self.cfg.hidden_size))
        return x

    def _rope(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(B, T)`` positions -> cos, sin of shape ``(B, 1, T, hd)``."""
        f = pos[..., None].astype(F32) * self.inv_freq  # (B, T, hd/2)
        emb = np.concatenate([f, f], axis=-1)[:, None]
        return np.cos(emb), np.sin(emb)

    @staticmethod
    def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        h = x.shape[-1] // 2
        rot = np.concatenate([-x[..., h:], x[..., :h]], axis=-1)
        return x * cos + rot * sin

    # -- forward -----------------------------------------------------------------------

    def forward(self, ids: np.ndarray, pos: np.ndarray, cache: KVCache, start: int) -> np.ndarray:
        """Run ``T`` new tokens per row and return the logits of the last one.

        Args:
            ids: ``(B, T)`` token ids written at cache slots ``start .. start+T-1``.
            pos: ``(B, T)`` their rotary positions.
            cache: the batch's KV cache; ``cache.valid`` marks real (non-pad) slots.
            start: first slot of these tokens.

        Returns:
            ``(B, V)`` float32 logits of each row's last token.
        """
        c = self.cfg
        b, t = ids.shape
        end = start + t
        hd, kvh, g = c.head_dim, c.num_kv_heads, self._group
        cos, sin = self._rope(pos)
        # additive mask (B, 1, 1, T, S): a key is visible when real, not in the future, in window
        slots = np.arange(end)
        q_slot = np.arange(start, end)[:, None]
        ok = (slots[None, :] <= q_slot)
        if c.sliding_window:
            ok &= slots[None, :] > q_slot - c.sliding_window
        ok = ok[None] & cache.valid[:, None, :end]
        bias = np.where(ok, F32(0.0), _NEG).astype(F32)[:, None, None]
        scale = F32(hd ** -0.5)
        x = self.embed(ids)
        for i in range(c.num_layers):
            h = self._norm(x, self.w[f"{i}.input_layernorm"])
            q = self._linear(h, i, "q_proj").reshape(b, t, kvh * g, hd).transpose(0, 2, 1, 3)
            k = self._linear(h, i, "k_proj").reshape(b, t, kvh, hd).transpose(0, 2, 1, 3)
            v = self._linear(h, i, "v_proj").reshape(b, t, kvh, hd).transpose(0, 2, 1, 3)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            cache.k[i][:, :, start:end] = k
            cache.v[i][:, :, start:end] = v
            ks, vs = cache.k[i][:, :, :end], cache.v[i][:, :, :end]  # (B, kvh, S, hd)
            # a kv head's g query heads are one (g*T, hd) block: B*kvh products, not B*kvh*g
            qg = q.reshape(b, kvh, g * t, hd) * scale
            s = (qg @ ks.swapaxes(-1, -2)).reshape(b, kvh, g, t, end)
            s += bias  # (B, kvh, g, T, S)
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            o = (s.reshape(b, kvh, g * t, end) @ vs).reshape(b, kvh * g, t, hd).transpose(
                0, 2, 1, 3)
            x = x + self._linear(o.reshape(b, t, kvh * g * hd), i, "o_proj")
            h = self._norm(x, self.w[f"{i}.post_attention_layernorm"])
            act = _gelu_tanh if c.act == "gelu_tanh" else _silu
            m = act(self._linear(h, i, "gate_proj")) * self._linear(h, i, "up_proj")
            x = x + self._linear(m, i, "down_proj")
        last = self._norm(x[:, -1], self.w["norm"])  # (B, d): already 2-D
        return last @ self.w["lm_head_t"]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits ``(T, V)`` of every position of one sequence (tests, scoring)."""
        n = len(ids)
        cache = KVCache.empty(self.cfg, 1, n)
        cache.valid[:, :n] = True
        out = []
        for j in range(n):  # position by position through the cache: exercises the decode path
            out.append(self.forward(np.asarray([[ids[j]]]), np.asarray([[j]]), cache, j)[0])
        return np.stack(out)


@dataclass
class KVCache:
    """Per-layer keys/values ``(B, kv_heads, S, hd)`` and which slots hold real tokens."""

    k: list[np.ndarray]
    v: list[np.ndarray]
    valid: np.ndarray  # (B, S) bool

    @classmethod
    def empty(cls, cfg: ArchConfig, batch: int, slots: int) -> KVCache:
        shape = (batch, cfg.num_kv_heads, slots, cfg.head_dim)
        return cls([np.zeros(shape, F32) for _ in range(cfg.num_layers)],
                   [np.zeros(shape, F32) for _ in range(cfg.num_layers)],
                   np.zeros((batch, slots), bool))

    def keep(self, rows: Sequence[int]) -> None:
        """Drop every row not in ``rows`` (finished generations)."""
        idx = np.asarray(rows)
        self.k = [a[idx] for a in self.k]
        self.v = [a[idx] for a in self.v]
        self.valid = self.valid[idx]


def limit_threads(n: int) -> None:
    """Cap the BLAS threads numpy multiplies with in this process (a fractional-CPU replica
    should not run one thread per core; ``torch.set_num_threads`` is the torch engine's twin)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n, user_api="blas")


def numpy_supported(model_dir: str | Path) -> str | None:
    """``None`` when the numpy engine can run the model in ``model_dir``, else the reason."""
    try:
        read_arch(model_dir)
    except (UnsupportedModelError, OSError, KeyError, ValueError) as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------- sampling


def sample_next(logits: np.ndarray, params: Sequence[SamplingParams],
                rng: np.random.Generator) -> np.ndarray:
    """One next token per row: argmax when greedy, else temperature + nucleus (top-p) sampling.

    Top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p`` (at least
    one), as ``transformers``' ``TopPLogitsWarper`` does.
    """
    out = logits.argmax(axis=-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        z = logits[i].astype(np.float64) / p.temperature
        z -= z.max()
        prob = np.exp(z)
        prob /= prob.sum()
        if p.top_p < 1.0:
            order = np.argsort(-prob, kind="stable")
            cum = np.cumsum(prob[order])
            n_keep = int(np.searchsorted(cum, p.top_p) + 1)
            keep = order[:n_keep]
            pk = prob[keep] / prob[keep].sum()
            out[i] = keep[rng.choice(len(keep), p=pk)]
        else:
            out[i] = rng.choice(len(prob), p=prob)
    return out


# ----------------------------------------------------------------------------- backend


class NumpyBackend:
    """:class:`~alignx.serve.backend.GenerationBackend` on a :class:`NumpyCausalLM`.

    Args:
        model: the model (base + adapter).
        tokenizer: its ``transformers`` tokenizer (torch-free to import); the chat template and
            decoding are exactly the ``transformers`` engine's.
        eos_ids: token ids that end a generation; default: the model's, else the tokenizer's.
        seed: seed of the sampling generator.
        prefill_chunk: prompt tokens per prefill forward pass (bounds its activations).
    """

    prefill_chunk: int = 128

    def __init__(self, model: NumpyCausalLM, tokenizer: Any, eos_ids: Sequence[int] | None = None,
                 seed: int | None = None, prefill_chunk: int = 128):
        self.model, self.tok, self.prefill_chunk = model, tokenizer, prefill_chunk
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        ids = list(eos_ids or model.eos_ids or [self.tok.eos_token_id])
        self.eos_ids: set[int] = {int(i) for i in ids if i is not None}
        self.rng = np.random.default_rng(seed)

    def count_tokens(self, prompt: str) -> int:
        return len(self._encode(prompt))

    def _encode(self, prompt: str) -> list[int]:
        return list(self.tok(prompt, add_special_tokens=False)["input_ids"])

    def _stopped(self, ids: list[int], p: SamplingParams) -> bool:
        if not p.stop:
            return False
        tail = self.tok.decode(ids[-16:], skip_special_tokens=True)
        return any(s in tail for s in p.stop)

    def _decode_loop(self, prompts: Sequence[list[int]],
                     params: Sequence[SamplingParams]) -> Iterator[list[list[int]]]:
        """Yield every row's new tokens after each step; a row stops at EOS, its limit or a stop
        string, and leaves the batch (and its cache) at once."""
        cfg = self.model.cfg
        n = len(prompts)
        lens = [len(p) for p in prompts]
        t = max(lens)
        steps = max(p.max_tokens for p in params)
        cache = KVCache.empty(cfg, n, t + steps)
        ids = np.zeros((n, t), np.int64)
        for r, p in enumerate(prompts):
            ids[r, t - len(p):] = p
            cache.valid[r, t - len(p):t] = True
        pos = np.maximum(np.cumsum(cache.valid[:, :t], axis=1) - 1, 0)
        # prefill in chunks: the (B, heads, chunk, S) scores and (B, chunk, d_ff) activations
        # stay bounded however long the prompts are
        for c0 in range(0, t, self.prefill_chunk):
            c1 = min(t, c0 + self.prefill_chunk)
            logits = self.model.forward(ids[:, c0:c1], pos[:, c0:c1], cache, c0)
        last_pos = np.asarray(lens) - 1
        out: list[list[int]] = [[] for _ in range(n)]
        alive = list(range(n))
        for step in range(steps):
            nxt = sample_next(logits, [params[r] for r in alive], self.rng)
            keep = []
            for j, r in enumerate(alive):
                tok = int(nxt[j])
                out[r].append(tok)
                if not (tok in self.eos_ids or len(out[r]) >= params[r].max_tokens
                        or self._stopped(out[r], params[r])):
                    keep.append(j)
            yield out
            if not keep:
                return
            if len(keep) < len(alive):
                cache.keep(keep)
                alive = [alive[j] for j in keep]
                nxt, last_pos = nxt[keep], last_pos[keep]
            slot = t + step
            cache.valid[:, slot] = True
            last_pos = last_pos + 1
            logits = self.model.forward(nxt[:, None], last_pos[:, None], cache, slot)

    def generate(self, prompts: Sequence[str], params: Sequence[SamplingParams]) -> list[Completion]:
        """Generate one completion per prompt, all rows in one batch (see the class docstring).

        Raises:
            ValueError: ``prompts`` and ``params`` differ in length, or a prompt is empty.
        """
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        if not prompts:
            return []
        enc = [self._encode(p) for p in prompts]
        if any(not e for e in enc):
            raise ValueError("a prompt encodes to no tokens")
        out: list[list[int]] = [[] for _ in prompts]
        for rows in self._decode_loop(enc, params):
            out = rows  # the same lists every step, grown in place
        return [finish_completion(self.tok, self.eos_ids, o, len(e), p)
                for o, e, p in zip(out, enc, params, strict=True)]

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[str | Completion]:
        """Stream one generation: text deltas, then the final :class:`Completion`.

        Text that could still become a stop string, or ends in an incomplete UTF-8 sequence,
        is held back until it is known, so a stop string never reaches the client. Closing the
        iterator stops the generation at the next step.
        """
        enc = self._encode(prompt)
        if not enc:
            raise ValueError("a prompt encodes to no tokens")
        held = StopHoldback(params.stop)
        for rows in self._decode_loop([enc], [params]):
            ids = [i for i in rows[0] if i not in self.eos_ids]
            text = self.tok.decode(ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its rest
                continue
            delta, found = held.feed(text)
            if delta:
                yield delta
            if found:
                break
        final = finish_completion(self.tok, self.eos_ids, rows[0], len(enc), params)
        if len(final.text) > held.sent:
            yield final.text[held.sent:]
        yield final
