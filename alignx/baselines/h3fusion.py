"""Baseline: an H3Fusion-style token-level mixture of the axis LoRA experts (METHOD.md).

H3Fusion fuses per-axis aligned models with a mixture of experts whose gate picks experts per
token in every layer; it is the "prior MoE" that the paper's latency and memory claims are
measured against. This module rebuilds that idea on AlignX's own Stage-1 experts, with the same
base model and budget as every other system:

* every Linear that the experts adapt (``q/k/v/o_proj`` on the shipped configs) becomes a
  :class:`GatedLoraLinear`: ``y = W x + sum_e g_e(x) * s_e * B_e A_e x`` with
  ``g(x) = softmax(G x + c)`` computed **per token** from the layer's own input, ``s_e`` the
  expert's ``alpha / r`` (``alpha / sqrt(r)`` for rsLoRA);
* the three experts (``<run_dir>/adapters/<axis>``) and the base are frozen; only the gates
  ``(G, c)`` train, one per adapted Linear, zero-initialised (the start is the uniform average
  of the experts);
* optional top-k (``baselines.h3fusion.gate_top_k``): the softmax runs over the k largest gate
  logits of each token and the others get weight 0;
* the objective is the answer loss of the union of the axes' training data plus
  ``balance_coef`` times a load-balancing term ``E * sum_e (mean_t g_e)^2`` per layer (1 when
  the experts are used equally on average, E when one expert takes everything) -- a simple
  stand-in for H3Fusion's gating regularisers that keeps the gates from collapsing onto one
  expert while leaving each token free to specialise.

The system text is the same at gate training and at inference: the three axis instructions
together (:func:`alignx.baselines.systems.union_system`); a request does not say which axis it
is about, so the gate has to tell from the content, not from an axis template.

Training runs as a Ray Train ``TorchTrainer`` with the project's DeepSpeed engine
(:func:`alignx.train.engine.init_engine`, ZeRO from ``train.deepspeed``) over the gate
parameters only, reusing Stage 1's data order, LR schedule and held-out loss helpers
(:mod:`alignx.train.loop`). Gate training is short, so it checkpoints once, at the end: a run
that fails is retried from its first step by Ray Train (``train.max_failures``). The driver
publishes ``<run_dir>/baselines/h3fusion/{gates.safetensors, config.yaml, manifest.json}``,
manifest last. Generation is plain ``transformers`` ``generate`` (with KV cache: the gate of a
token depends on that token's input only).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from alignx.artifacts import (
    ArtifactLayout,
    ArtifactMismatchError,
    ArtifactNotFoundError,
    H3FusionManifest,
    check_same_base,
    read_manifest,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
)
from alignx.axes import Axis

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from alignx.config import AlignXConfig, ModelCfg

log = logging.getLogger(__name__)

NAME = "h3fusion"
#: The config stage whose hash the gate manifest records (``AlignXConfig.stage_hash``).
STAGE = "baselines"
GATES_FILE = "gates.safetensors"
STATE_FILE = "gate_state.json"
_PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------- the gated layer


class GatedLoraLinear(nn.Module):
    """A frozen Linear plus E frozen LoRA experts mixed per token by a trainable gate.

    Args:
        base: the frozen base ``nn.Linear`` (kept as is, weights shared).
        lora_a: ``(E, r, in)`` expert down-projections (ranks padded with zero rows).
        lora_b: ``(E, out, r)`` expert up-projections (padded with zero columns).
        scaling: ``(E,)`` each expert's ``alpha / r``.
        top_k: experts mixed per token; ``None`` = all of them.
    """

    def __init__(self, base: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 scaling: torch.Tensor, top_k: int | None = None):
        super().__init__()
        n_exp = lora_a.shape[0]
        if lora_b.shape[0] != n_exp or scaling.shape != (n_exp,):
            raise ValueError(f"expert tensors disagree: A {tuple(lora_a.shape)}, "
                             f"B {tuple(lora_b.shape)}, scaling {tuple(scaling.shape)}")
        if top_k is not None and not 1 <= top_k <= n_exp:
            raise ValueError(f"top_k={top_k} must be between 1 and the {n_exp} experts")
        self.base = base
        dtype = base.weight.dtype
        # Frozen expert weights are buffers: no optimizer or ZeRO partition ever sees them,
        # and they stay out of the saved gate state.
        self.register_buffer("lora_a", lora_a.to(dtype), persistent=False)
        self.register_buffer("lora_b", lora_b.to(dtype), persistent=False)
        self.register_buffer("scaling", scaling.to(dtype), persistent=False)
        self.gate = nn.Linear(base.in_features, n_exp, dtype=dtype, device=base.weight.device)
        nn.init.zeros_(self.gate.weight)  # uniform mixture at the start
        nn.init.zeros_(self.gate.bias)
        self.top_k = top_k
        self.record = False  # keep the last gate probabilities (for the balance loss)
        self.last_probs: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return int(self.lora_a.shape[0])

    def gate_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights ``(..., E)``; each row sums to 1."""
        logits = self.gate(x).float()  # (..., E)
        if self.top_k is not None and self.top_k < self.num_experts:
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]  # (..., 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.softmax(logits, dim=-1).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        g = self.gate_probs(x)  # (..., E)
        if self.record:
            self.last_probs = g
        h = torch.einsum("...i,eri->...er", x, self.lora_a)  # (..., E, r)
        h = h * (g * self.scaling).unsqueeze(-1)
        return y + torch.einsum("...er,eor->...o", h, self.lora_b)  # (..., out)


def gated_modules(model: nn.Module) -> dict[str, GatedLoraLinear]:
    """``{module path: layer}`` of every gated Linear in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, GatedLoraLinear)}


# ----------------------------------------------------------------------------- experts -> model


@dataclass(frozen=True)
class ExpertWeights:
    """The LoRA weights of E experts, stacked per adapted module.

    Attributes:
        axes: expert order (the gate's output order).
        modules: ``{module path: (A (E, r, in), B (E, out, r))}``.
        scaling: ``(E,)`` ``alpha / r`` per expert.
        manifests: ``{axis: sha256[:16] of its adapter manifest}`` (provenance of the gates).
        template_ids: ``{axis: template id its adapter was trained with}``.
    """

    axes: tuple[Axis, ...]
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: torch.Tensor
    manifests: dict[str, str]
    template_ids: dict[str, str]


def _read_adapter(folder: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """One PEFT LoRA adapter folder -> ``({module path: (A, B)}, scaling)``.

    Raises:
        ValueError: an adapter this mixture cannot represent (DoRA, per-module ranks, bias...).
    """
    from safetensors.torch import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text("utf-8"))
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "lora_bias")
                   if cfg.get(k)]
    if cfg.get("peft_type", "LORA") != "LORA" or unsupported:
        raise ValueError(f"{folder}: only plain LoRA adapters can be fused (found "
                         f"{cfg.get('peft_type')} with {unsupported})")
    r = int(cfg["r"])
    scaling = float(cfg["lora_alpha"]) / (math.sqrt(r) if cfg.get("use_rslora") else r)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise ValueError(f"{folder}: unexpected tensor {key!r} (not a LoRA A/B matrix)")
            continue
        path = key.removeprefix(_PEFT_PREFIX).removesuffix(".lora_A.weight")
        out[path] = (a, tensors[key.replace(".lora_A.", ".lora_B.")])
    return out, scaling


def load_expert_weights(run_dir: str | Path, axes: Sequence[Axis], base_model: str) -> ExpertWeights:
    """Read the axes' adapters of a run and stack them per module (ranks padded to the largest).

    Args:
        run_dir: the run directory (``adapters/<axis>``).
        axes: the experts, in gate order.
        base_model: the base model id the adapters must have been trained on.

    Returns:
        The stacked :class:`ExpertWeights`.

    Raises:
        ArtifactNotFoundError: an adapter is missing (names ``alignx train``).
        ArtifactMismatchError: an adapter was trained on another base model.
        ValueError: the experts adapt different modules, or are not plain LoRA.
    """
    layout = ArtifactLayout(run_dir)
    per: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    scalings, shas, tids = [], {}, {}
    for a in axes:
        m = layout.load_adapter_manifest(a)
        check_same_base(base_model, m.base_model, f"adapter {a.value!r}")
        mods, s = _read_adapter(layout.adapter_dir(a))
        per.append(mods)
        scalings.append(s)
        shas[a.value] = sha256_file(layout.adapter_manifest(a))[:16]
        tids[a.value] = m.template_ids.get(a.value, "")
    names = set(per[0])
    for a, mods in zip(axes, per, strict=True):
        if set(mods) != names:
            raise ValueError(f"expert {a.value!r} adapts other modules than {axes[0].value!r}: "
                             f"{sorted(set(mods) ^ names)[:4]}; train them with one "
                             "train.lora.target_modules")
    stacked: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in sorted(names):
        r = max(p[name][0].shape[0] for p in per)
        a_list, b_list = [], []
        for p in per:
            a, b = p[name]
            a_list.append(torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])]))
            b_list.append(torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], dim=1))
        stacked[name] = (torch.stack(a_list), torch.stack(b_list))
    return ExpertWeights(tuple(axes), stacked, torch.tensor(scalings), shas, tids)


def attach_gates(model: nn.Module, experts: ExpertWeights, top_k: int | None = None) -> nn.Module:
    """Replace every module the experts adapt by a :class:`GatedLoraLinear` (in place).

    The base weights stay frozen and shared; only the new gates require gradients.

    Args:
        model: the base causal LM.
        experts: from :func:`load_expert_weights`.
        top_k: see :class:`GatedLoraLinear`.

    Returns:
        ``model`` (for chaining).

    Raises:
        ValueError: an adapted module is missing from ``model`` or is not a Linear.
    """
    model.requires_grad_(False)
    for path, (a, b) in experts.modules.items():
        parent_name, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, attr, None)
        if not isinstance(lin, nn.Linear) or lin.weight.shape != (b.shape[1], a.shape[2]):
            raise ValueError(f"the experts adapt {path!r}, which is not a matching Linear in "
                             f"{type(model).__name__}; were they trained on this base model?")
        gated = GatedLoraLinear(lin, a, b, experts.scaling, top_k)
        gated.gate.requires_grad_(True)
        setattr(parent, attr, gated)
    return model


def gate_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable gate tensors, keyed ``<module path>.gate.{weight,bias}`` (CPU copies)."""
    return {f"{n}.gate.{k}": t.detach().to("cpu", copy=True)
            for n, m in gated_modules(model).items() for k, t in m.gate.state_dict().items()}


def load_gate_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load gate tensors saved by :func:`gate_state_dict` / :func:`save_gates` (strict).

    Raises:
        ValueError: the keys or shapes do not match this model's gated modules.
    """
    want = gate_state_dict(model)
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    bad = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or extra or bad:
        raise ValueError(f"gates do not fit this model: missing {missing[:3]}, unexpected "
                         f"{extra[:3]}, wrong shape {bad[:3]}")
    for n, m in gated_modules(model).items():
        m.gate.load_state_dict({k: state[f"{n}.gate.{k}"] for k in ("weight", "bias")})


def gates_to_bytes(state: dict[str, torch.Tensor], axes: Sequence[Axis]) -> bytes:
    """Serialise gate tensors as safetensors (the expert order goes into the metadata)."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()},
                metadata={"axes": ",".join(a.value for a in axes)})


def read_gates(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``gates.safetensors`` file.

    Raises:
        ArtifactNotFoundError: the file does not exist.
        ValueError: it is not a readable safetensors file.
    """
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise ArtifactNotFoundError(f"missing artifact: {p}")
    try:
        return load_file(str(p))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{p}: unreadable gates ({e}); retrain the h3fusion baseline") from None


def h3fusion_balance_loss(model: nn.Module, attention_mask: torch.Tensor) -> torch.Tensor:
    """Load-balancing term of the last forward: mean over gated layers of ``E sum_e u_e^2``,
    ``u`` the layer's mean gate weight over the batch's real (unpadded) tokens.

    Args:
        model: a gated model whose layers ran with ``record = True``.
        attention_mask: ``(B, T)`` of that forward.

    Returns:
        A scalar in ``[1, E]`` (1 = equal average use).
    """
    mask = attention_mask.bool()
    terms = []
    for m in gated_modules(model).values():
        if m.last_probs is None:
            continue
        u = m.last_probs[mask].float().mean(0)  # (E,)
        terms.append(m.num_experts * (u * u).sum())
    if not terms:
        raise RuntimeError("no gate probabilities recorded; set record=True on the gated layers")
    return torch.stack(terms).mean()


def h3fusion_loss(model: nn.Module, batch: dict[str, torch.Tensor], balance_coef: float,
                  forward: Any = None) -> tuple[torch.Tensor, float, float]:
    """The gate-training objective on one batch: answer loss + ``balance_coef`` x balance.

    Args:
        model: the gated model (its gated layers record their probabilities here).
        batch: ``input_ids``, ``attention_mask``, ``labels`` (prompt tokens -100).
        balance_coef: weight of :func:`h3fusion_balance_loss`.
        forward: what to call on the batch (the DeepSpeed engine); default ``model``.

    Returns:
        ``(total loss tensor, answer loss, balance term)``.
    """
    layers = gated_modules(model).values()
    for m in layers:
        m.record = True
    try:
        lm = (forward or model)(**batch).loss
        bal = h3fusion_balance_loss(model, batch["attention_mask"])
    finally:
        for m in layers:
            m.record, m.last_probs = False, None
    return lm + balance_coef * bal, float(lm.detach()), float(bal.detach())


# ----------------------------------------------------------------------------- artifacts


def h3fusion_dir(run_dir: str | Path) -> Path:
    """``<run_dir>/baselines/h3fusion``."""
    return ArtifactLayout(run_dir).baseline_dir(NAME)


def h3fusion_manifest_path(run: AlignXConfig | str | Path) -> Path:
    """``<run_dir>/baselines/h3fusion/manifest.json`` of a config or a run directory."""
    return h3fusion_dir(run if isinstance(run, str | Path) else run.run_dir) / "manifest.json"


def load_h3fusion_manifest(run_dir: str | Path) -> H3FusionManifest:
    """The gate manifest of a run.

    Raises:
        ArtifactNotFoundError: no trained gates (names how to make them).
        ValueError: an invalid manifest.
    """
    p = h3fusion_manifest_path(run_dir)
    if not p.is_file():
        raise ArtifactNotFoundError(
            f"no trained h3fusion gates in {ArtifactLayout(run_dir).root} (run the pipeline, or "
            "alignx.baselines.h3fusion.train_h3fusion(cfg), on this run directory first)")
    return read_manifest(p, H3FusionManifest)


def load_h3fusion(
    run_dir: str | Path, model_cfg: ModelCfg, base: PreTrainedModel | None = None
) -> tuple[PreTrainedModel, H3FusionManifest]:
    """The base model with the run's experts and trained gates, ready to generate.

    Args:
        run_dir: the run directory.
        model_cfg: the configured base model.
        base: a freshly loaded base model (e.g. on shared weights); default ``load_base``.

    Returns:
        ``(model in eval mode, gate manifest)``.

    Raises:
        ArtifactNotFoundError: no gates or no experts.
        ArtifactMismatchError: another base model, or experts retrained since the gates were.
    """
    from alignx.modeling import base_model_id, load_base

    manifest = load_h3fusion_manifest(run_dir)
    check_same_base(base_model_id(model_cfg), manifest.base_model, "the h3fusion gates")
    experts = load_expert_weights(run_dir, manifest.axes, manifest.base_model)
    if experts.manifests != manifest.experts:
        raise ArtifactMismatchError(
            f"the experts of {ArtifactLayout(run_dir).root} changed after the h3fusion gates were "
            "trained on them; retrain the gates (train_h3fusion with force=True)")
    model = base if base is not None else load_base(model_cfg)[0]
    attach_gates(model, experts, manifest.gate_top_k)
    load_gate_state(model, read_gates(h3fusion_dir(run_dir) / GATES_FILE))
    model.requires_grad_(False)
    model.eval()
    return model, manifest


# ----------------------------------------------------------------------------- training


def _encode_union(cfg: AlignXConfig, tokenizer: PreTrainedTokenizerBase, split: str,
                  system: str | None) -> dict[Axis, list[dict[str, list[int]]]]:
    """Each axis's prepared ``split``, injected with the union system text, encoded."""
    from alignx.data.injection import inject_system
    from alignx.data.prepare import load_split
    from alignx.data.tokenize import encode_rows

    out = {}
    for a in cfg.axes:
        rows = [{**r, "injected": inject_system(r["messages"], system) if system else r["messages"]}
                for r in load_split(cfg.run_dir, a, split)]
        out[a] = encode_rows(rows, tokenizer, cfg.model.max_seq_len, injected=True)
    return out


def gate_loop_per_worker(config: dict[str, Any]) -> None:
    """Train the gates on this worker's share of the data (run by ``TorchTrainer``).

    Args:
        config: ``{"cfg": AlignXConfig as JSON}`` from :func:`train_h3fusion`.
    """
    import ray.train
    import ray.train.torch

    from alignx.baselines.systems import union_system
    from alignx.config import AlignXConfig
    from alignx.data.tokenize import collate
    from alignx.modeling import base_model_id, load_base, resolve_dtype
    from alignx.train.deepspeed import build_deepspeed_config
    from alignx.train.engine import init_engine, trainable_state_dict
    from alignx.train.loop import (
        _setup_worker_logging,
        epoch_order,
        heldout_answer_loss,
        lr_multiplier,
        micro_batch,
        plan_steps,
        warmup_steps,
    )

    _setup_worker_logging()
    cfg = AlignXConfig.model_validate(config["cfg"])
    hc, tc = cfg.baselines.h3fusion, cfg.train
    _fetch_inputs(cfg)  # a worker on another node brings data + experts from shared storage
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = tc.scaling.use_gpu
    torch.set_num_threads(tc.threads_per_worker or max(1, int(tc.scaling.cpus_per_worker)))

    # model: frozen base + frozen experts + trainable gates
    base, tok = load_base(cfg.model, use_gpu=use_gpu)
    experts = load_expert_weights(cfg.run_dir, cfg.axes, base_model_id(cfg.model))
    model = attach_gates(base, experts, hc.gate_top_k)
    model.train()
    gates = [p for p in model.parameters() if p.requires_grad]

    # data: the union of the axes' train splits, with the system text used at inference
    _, system = union_system(experts.template_ids, cfg.axes)
    train = [ex for exs in _encode_union(cfg, tok, "train", system).values() for ex in exs]
    optim = tc.optim.model_copy(update={"lr": hc.lr, "micro_batch_size": hc.micro_batch_size,
                                        "grad_accum": 1, "weight_decay": 0.0})
    steps_per_epoch, total = plan_steps(len(train), optim, world, hc.steps)
    warmup = warmup_steps(total, optim.warmup_ratio)

    ds_config = build_deepspeed_config(tc.model_copy(update={"optim": optim}), world,
                                       resolve_dtype(cfg.model.dtype, use_gpu))
    engine = init_engine(model, ds_config, gates, use_gpu=use_gpu,
                         device_index=ray.train.torch.get_device().index if use_gpu else None,
                         lr_lambda=lambda s: lr_multiplier(s, total, warmup))
    if rank == 0:
        log.info("[h3fusion] %d gated modules, %d gate parameters, %d examples, %d steps",
                 len(gated_modules(model)), sum(p.numel() for p in gates), len(train), total)

    losses: list[float] = []
    tokens, t0 = 0, time.perf_counter()
    for step in range(total):
        epoch, b = divmod(step, steps_per_epoch)
        order = epoch_order(len(train), cfg.seed, epoch)
        idx = micro_batch(order, b, optim.micro_batch_size, world, rank)
        batch = {k: v.to(engine.device) for k, v in
                 collate([train[i] for i in idx], tok.pad_token_id).items()}
        loss, lm, bal = h3fusion_loss(model, batch, hc.balance_coef, forward=engine)
        engine.backward(loss)
        engine.step()
        losses.append(lm)
        tokens += int(batch["attention_mask"].sum())
        if rank == 0 and (step + 1) % max(1, total // 10) == 0:
            log.info("[h3fusion] step %d/%d answer loss %.4f balance %.3f", step + 1, total, lm, bal)
    seconds = time.perf_counter() - t0

    # held-out answer loss per axis, then one checkpoint with the gates
    val = _encode_union(cfg, tok, "validation", system)
    eval_loss = {a.value: heldout_answer_loss(engine, val[a], optim.micro_batch_size,
                                              tok.pad_token_id, tc.eval_batches, rank, world)
                 for a in cfg.axes}
    state = {k.removeprefix("module."): v for k, v in trainable_state_dict(engine).items()}
    window = min(len(losses), max(1, total // 10))
    metrics = {"steps": total, "tokens": tokens * world, "train_seconds": seconds,
               "first_loss": sum(losses[:window]) / window, "train_loss": sum(losses[-window:]) / window,
               **{f"eval_loss/{k}": v for k, v in eval_loss.items()}}
    with tempfile.TemporaryDirectory(prefix="alignx-h3fusion-") as tmp:
        if rank == 0:
            write_bytes_atomic(Path(tmp) / GATES_FILE, gates_to_bytes(state, cfg.axes))
            write_json_atomic(Path(tmp) / STATE_FILE, {**metrics, "losses": losses})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _fetch_inputs(cfg: AlignXConfig, *extra: str) -> None:
    """With shared storage, bring the finished data and experts (and ``extra``) into run_dir."""
    from alignx.storage import fetch

    layout = ArtifactLayout(cfg.run_dir)
    fetch(cfg, *(layout.data_dir(a) for a in cfg.axes), *(layout.adapter_dir(a) for a in cfg.axes),
          *extra)


def finished_h3fusion(cfg: AlignXConfig) -> H3FusionManifest | None:
    """The run's gate manifest if it is up to date with ``cfg`` and the current experts."""
    try:
        m = load_h3fusion_manifest(cfg.run_dir)
        experts = load_expert_weights(cfg.run_dir, m.axes, m.base_model)
    except (ArtifactNotFoundError, ValueError):
        return None
    fresh = m.config_hash == cfg.stage_hash(STAGE) and experts.manifests == m.experts
    return m if fresh else None


def train_h3fusion(cfg: AlignXConfig, *, force: bool = False) -> H3FusionManifest:
    """Train the h3fusion gates of ``cfg.run_dir`` (Ray Train + DeepSpeed) and publish them.

    Skipped (the existing manifest is returned) when gates made from the same config sections
    (``cfg.stage_hash("baselines")``) and the same experts exist, unless ``force``.

    Args:
        cfg: the run config; ``baselines.h3fusion`` holds steps, lr, batch, top-k, balance.
        force: retrain even when up to date.

    Returns:
        The manifest of ``<run_dir>/baselines/h3fusion/``.

    Raises:
        ArtifactNotFoundError: missing prepared data or experts (names the command).
        ArtifactMismatchError: experts trained on another base model.
        ray.train.TrainingFailedError: the workers failed more than ``train.max_failures`` times.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from alignx.baselines.systems import union_system
    from alignx.modeling import base_model_id
    from alignx.storage import publish, ray_train_location
    from alignx.train.trainer import ensure_ray

    layout = ArtifactLayout(cfg.run_dir)
    cfg = cfg.model_copy(update={"run_dir": str(layout.root)})
    _fetch_inputs(cfg, f"baselines/{NAME}")
    if not force and (done := finished_h3fusion(cfg)) is not None:
        log.info("h3fusion gates are up to date; skipping (force=True retrains)")
        return done
    for a in cfg.axes:  # fail on the driver, before any Ray work
        layout.load_data_manifest(a)
    experts = load_expert_weights(layout.root, cfg.axes, base_model_id(cfg.model))
    template_id, system = union_system(experts.template_ids, cfg.axes)
    sc, hc = cfg.train.scaling, cfg.baselines.h3fusion
    resources = {"CPU": sc.cpus_per_worker} | ({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})
    run_name = f"{NAME}-{cfg.stage_hash(STAGE)[:8]}-{int(time.time())}"
    storage_path, storage_fs = ray_train_location(cfg)
    ensure_ray()
    trainer = TorchTrainer(
        gate_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json")},
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures)),
    )
    log.info("[h3fusion] training gates over %s -> %s", [a.value for a in cfg.axes],
             h3fusion_dir(layout.root))
    t0 = time.time()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"[h3fusion] Ray Train finished without a checkpoint ({result.path})")
    out = h3fusion_dir(layout.root)
    (out / "manifest.json").unlink(missing_ok=True)  # the folder is unfinished until the end
    with result.checkpoint.as_directory() as ckpt:
        gates = read_gates(Path(ckpt) / GATES_FILE)
        write_bytes_atomic(out / GATES_FILE, (Path(ckpt) / GATES_FILE).read_bytes())
        write_bytes_atomic(out / STATE_FILE, (Path(ckpt) / STATE_FILE).read_bytes())
    m = result.metrics or {}
    manifest = H3FusionManifest(
        axes=list(cfg.axes), base_model=base_model_id(cfg.model), experts=experts.manifests,
        system=system or "", template_id=template_id, gate_top_k=hc.gate_top_k,
        balance_coef=hc.balance_coef, gated_modules=len(gates) // 2,
        gate_params=sum(t.numel() for t in gates.values()), steps=int(m.get("steps", hc.steps)),
        lr=hc.lr, micro_batch_size=hc.micro_batch_size, train_tokens=int(m.get("tokens", 0)),
        train_loss=m.get("train_loss"), first_loss=m.get("first_loss"),
        eval_loss={k.split("/", 1)[1]: float(v) for k, v in m.items()
                   if k.startswith("eval_loss/") and math.isfinite(v)},
        train_seconds=round(time.time() - t0, 2), config_hash=cfg.stage_hash(STAGE),
        ray_run=str(result.path),
    )
    layout.save_config(cfg, f"baselines/{NAME}/config.yaml")
    write_json_atomic(out / "manifest.json", manifest)  # last: the gates are complete
    publish(cfg, out)  # with shared storage: upload, manifest last
    log.info("[h3fusion] gates -> %s (%d steps, answer loss %.4f -> %.4f, eval %s, %.0f s)", out,
             manifest.steps, manifest.first_loss or float("nan"),
             manifest.train_loss or float("nan"), manifest.eval_loss, manifest.train_seconds)
    return manifest
