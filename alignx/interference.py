"""Stage 1 report: is each expert better on its own axis, and how disjoint are the axes?

Two diagnostics of Axis Collapse (METHOD.md, Stage 1):

* **Held-out answer loss** (mean NLL per response token) on each axis's validation split,
  for the base model, every axis expert and the multi-task adapter, under two prompt
  conditions given identically to every system: ``injected`` (the eval axis's template as
  system prompt, as in training) and ``plain`` (no template, so a gain is not just format).
* **Task vectors**: per adapted module, Delta W = (alpha / r) B A; the cosine similarity between
  two adapters' concatenated Delta W over all layers says how much their updates overlap.

Writes ``<run_dir>/stage1_report.json`` and returns it with a printable ``table``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from alignx.artifacts import MULTITASK, ArtifactLayout, check_same_base, write_json_atomic
from alignx.axes import Axis

if TYPE_CHECKING:
    from alignx.config import AlignXConfig

log = logging.getLogger(__name__)

BASE = "base"
CONDITIONS = ("injected", "plain")


# ----------------------------------------------------------------------------- task vectors


def _lora_pairs(adapter_dir: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """Module name -> (A, B) from a PEFT adapter, and its scale alpha / r."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = float(cfg["lora_alpha"]) / float(cfg["r"])
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        for part in ("lora_A", "lora_B"):
            tag = f".{part}."
            if tag in k:
                pairs.setdefault(k.split(tag)[0], {})[part] = v.float()
    out = {m: (p["lora_A"], p["lora_B"]) for m, p in pairs.items() if len(p) == 2}
    if not out:
        raise ValueError(f"{adapter_dir}: no LoRA A/B tensors found in adapter_model.safetensors")
    return out, scale


def task_vector_cosines(adapter_dirs: dict[str, Path]) -> dict[str, Any]:
    """Cosine similarity between adapters' task vectors (Delta W = (alpha/r) B A, all layers).

    Computed module by module (dot products and norms accumulate), so no full-model vector is
    ever materialised.

    Returns:
        ``{"names": [...], "matrix": [[...]], "norms": {...}}``.
    """
    names = list(adapter_dirs)
    loaded = {n: _lora_pairs(d) for n, d in adapter_dirs.items()}
    modules = sorted(set.intersection(*(set(p) for p, _ in loaded.values())))
    if not modules:
        raise ValueError("the adapters share no adapted module; were they trained on one base model?")
    dots = np.zeros((len(names), len(names)))
    for m in modules:
        deltas = []
        for n in names:
            pairs, scale = loaded[n]
            a, b = pairs[m]  # A: (r, in), B: (out, r)
            deltas.append((scale * (b @ a)).flatten())  # (out*in,)
        stack = torch.stack(deltas)  # (n_adapters, out*in)
        dots += (stack @ stack.T).double().numpy()
    norms = np.sqrt(np.clip(np.diag(dots), 1e-30, None))
    cos = dots / np.outer(norms, norms)
    return {
        "names": names,
        "matrix": np.round(cos, 4).tolist(),
        "norms": {n: float(x) for n, x in zip(names, norms, strict=False)},
        "modules": len(modules),
    }


# ----------------------------------------------------------------------------- held-out loss


@torch.no_grad()
def answer_loss(model, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean NLL per response token (labels != -100) over ``batches``."""
    total, count = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logits = logits[:, :-1].float()  # (B, T-1, V)
        labels = b["labels"][:, 1:]  # (B, T-1)
        mask = labels != -100
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.clamp(min=0).reshape(-1), reduction="none"
        ).view_as(labels)
        total += float(nll[mask].sum())
        count += int(mask.sum())
    return total / max(count, 1)


def _eval_batches(cfg: AlignXConfig, tok, axis: Axis, condition: str, max_examples: int | None,
                  batch_size: int = 8):
    from alignx.data.prepare import load_split
    from alignx.data.tokenize import collate, encode_sft

    rows = load_split(cfg.run_dir, axis, "validation")[:max_examples]
    key = "injected" if condition == "injected" else "messages"
    enc = [encode_sft(r[key], r["response"], tok, cfg.model.max_seq_len) for r in rows]
    pad = tok.pad_token_id
    return [collate(enc[i : i + batch_size], pad) for i in range(0, len(enc), batch_size)]


def stage1_report(cfg: AlignXConfig, max_examples: int | None = None) -> dict[str, Any]:
    """Held-out answer losses of base / experts / multi-task and the task-vector cosine matrix.

    Args:
        cfg: the run config.
        max_examples: use the first N validation examples of each axis (default: all prepared).

    Raises:
        ArtifactNotFoundError: prepared data or an axis adapter is missing.
        ArtifactMismatchError: an adapter was trained on another base model.
    """
    from peft import PeftModel

    from alignx.modeling import base_model_id, load_base
    from alignx.storage import fetch, publish

    layout = ArtifactLayout(cfg.run_dir)
    fetch(cfg, *(layout.data_dir(a) for a in cfg.axes),  # with shared storage: finished copies
          *(layout.adapter_dir(a) for a in [*cfg.axes, MULTITASK]))
    systems: dict[str, Path] = {}
    for a in cfg.axes:
        m = layout.load_adapter_manifest(a)
        check_same_base(base_model_id(cfg.model), m.base_model, f"adapter {a.value}")
        systems[a.value] = layout.adapter_dir(a)
    if layout.adapter_manifest(MULTITASK).is_file():
        m = layout.load_adapter_manifest(MULTITASK)
        check_same_base(base_model_id(cfg.model), m.base_model, "the multi-task adapter")
        systems[MULTITASK] = layout.adapter_dir(MULTITASK)

    model, tok = load_base(cfg.model, use_gpu=False)
    names = list(systems)
    peft = PeftModel.from_pretrained(model, str(systems[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(str(systems[n]), adapter_name=n)
    peft.eval()

    losses: dict[str, dict[str, dict[str, float]]] = {c: {} for c in CONDITIONS}
    counts: dict[str, int] = {}
    for cond in CONDITIONS:
        for axis in cfg.axes:
            batches = _eval_batches(cfg, tok, axis, cond, max_examples)
            counts[axis.value] = sum(int(b["input_ids"].shape[0]) for b in batches)
            row: dict[str, float] = {}
            with peft.disable_adapter():
                row[BASE] = answer_loss(peft, batches)
            for n in names:
                peft.set_adapter(n)
                row[n] = answer_loss(peft, batches)
            losses[cond][axis.value] = row
            log.info("%s/%s: %s", cond, axis.value, {k: round(v, 4) for k, v in row.items()})

    tv = task_vector_cosines(systems)
    checks = _own_axis_checks(losses, [a.value for a in cfg.axes])
    report = {
        "base_model": base_model_id(cfg.model),
        "metric": "held-out answer loss (mean NLL per response token, validation split; lower is better)",
        "examples_per_axis": counts,
        "answer_loss": losses,
        "own_axis_best": checks,
        "task_vector_cosine": tv,
        "config_hash": cfg.stage_hash("train"),  # the adapters it describes
    }
    report["table"] = format_table(report)
    write_json_atomic(layout.stage1_report, report)
    publish(cfg, layout.stage1_report)
    return report


def _own_axis_checks(losses: dict, axes: list[str]) -> dict[str, dict[str, bool]]:
    """Per condition and axis: is the axis's expert below the base model and every other expert?"""
    out: dict[str, dict[str, bool]] = {}
    for cond, per_axis in losses.items():
        out[cond] = {}
        for a in axes:
            row = per_axis[a]
            others = [row[b] for b in axes if b != a] + [row[BASE]]
            out[cond][a] = bool(row[a] < min(others))
    return out


def format_table(report: dict[str, Any]) -> str:
    """Plain-text tables: losses per condition (rows = systems, columns = eval axes) + cosines."""
    lines = [f"Stage 1 report — {report['metric']}"]
    for cond, per_axis in report["answer_loss"].items():
        axes = list(per_axis)
        systems = list(next(iter(per_axis.values())))
        lines.append(f"\n[{cond} prompts]  " + "".join(f"{a:>14}" for a in axes))
        for s in systems:
            cells = []
            for a in axes:
                v = per_axis[a][s]
                best = v <= min(per_axis[a].values()) + 1e-12
                cells.append(f"{v:>13.4f}{'*' if best else ' '}")
            lines.append(f"{s:<18}" + "".join(cells))
        ok = report["own_axis_best"][cond]
        lines.append("own-axis expert best: " + ", ".join(f"{a}={'yes' if v else 'NO'}" for a, v in ok.items()))
    tv = report["task_vector_cosine"]
    lines.append(f"\ntask-vector cosine similarity ({tv['modules']} modules)")
    lines.append(" " * 14 + "".join(f"{n:>14}" for n in tv["names"]))
    for n, row in zip(tv["names"], tv["matrix"], strict=False):
        lines.append(f"{n:<14}" + "".join(f"{x:>14.3f}" for x in row))
    return "\n".join(lines)
