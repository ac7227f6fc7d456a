"""Stage 1 (train): the LoRA adapter configuration of an axis expert.

A pure builder from our ``train.lora`` config section to ``peft.LoraConfig``; the target
modules default to the model registry's entry (:mod:`alignx.models`), so a config does not
have to repeat them per model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alignx.models import get_spec

if TYPE_CHECKING:
    from peft import LoraConfig

    from alignx.config import LoraCfg


def resolve_target_modules(lora_cfg: LoraCfg, model_name: str) -> list[str]:
    """The modules LoRA adapts: the config's list, else the registry's default for the model.

    Args:
        lora_cfg: the ``train.lora`` section.
        model_name: ``model.name`` (a registry name, a local path or a Hub id).

    Returns:
        Module names such as ``["q_proj", "k_proj", "v_proj", "o_proj"]``.

    Raises:
        ValueError: the model is not in the registry and ``train.lora.target_modules`` is unset.
    """
    if lora_cfg.target_modules:
        return list(lora_cfg.target_modules)
    spec = get_spec(model_name)
    if spec is None:
        raise ValueError(
            f"model {model_name!r} is not in the registry, so its LoRA targets are unknown: "
            "set train.lora.target_modules (e.g. [q_proj, v_proj])"
        )
    return list(spec.lora_targets)


def build_lora_config(lora_cfg: LoraCfg, model_name: str) -> LoraConfig:
    """Build the ``peft.LoraConfig`` of an axis adapter (task ``CAUSAL_LM``).

    Args:
        lora_cfg: the ``train.lora`` section (rank, alpha, dropout, target_modules).
        model_name: ``model.name``; decides the default target modules.

    Returns:
        A ``LoraConfig`` with ``r``, ``lora_alpha``, ``lora_dropout`` and ``target_modules`` set
        and no bias training, so the adapter holds only the A/B matrices.

    Raises:
        ValueError: see :func:`resolve_target_modules`.
    """
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora_cfg.rank,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=resolve_target_modules(lora_cfg, model_name),
        bias="none",
    )
