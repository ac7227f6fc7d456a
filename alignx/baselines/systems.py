"""Every generating system of a run, loaded one way for serving and for scoring.

:func:`load_system` returns a :class:`LoadedSystem` -- a torch causal LM (``model(...)
.logits``), its tokenizer and the system text injected before the chat template -- for

* ``expert-<axis>``: the base + that axis's LoRA adapter, with the axis template it was
  trained with (what AlignX's router dispatches to);
* ``base``: the base model alone, with no injected text (the chat template's own default);
* ``multitask``: the base + Stage 1's single multi-task adapter (``adapters/multitask``);
* ``h3fusion``: the base + the three experts mixed per token by trained gates
  (:mod:`alignx.baselines.h3fusion`).

The Serve deployments (``expert-<axis>``, ``system-<name>``) build their generation backend
from this object and the evaluation's log-likelihood scoring (TruthfulQA MC1/MC2) uses the very
same one, so serving and scoring cannot drift apart.

**System text of the systems that know no axis.** The multi-task adapter was trained on every
axis's examples, each injected with *its own* axis template (``adapters/multitask/manifest.json``
``template_ids``), so it has never seen a conversation without an axis instruction. At
inference a request does not say which axis it is about, and picking a template per request
would need a router, i.e. AlignX itself. ``multitask`` (and ``h3fusion``, whose gates are
trained this way, see its module) therefore get :func:`union_system`: the three axis
instructions together, in axis order -- the objectives it was trained on, all at once, which
is what a single multi-objective model is asked to do. The id ``union:<id>+<id>+<id>`` names
the exact texts. When the data was prepared without injection (``data.inject: false``), the
adapters saw no system text and none is added.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignx.artifacts import (
    MULTITASK,
    AdapterManifest,
    ArtifactLayout,
    check_same_base,
    sha256_file,
)
from alignx.axes import Axis, parse_axis
from alignx.data.injection import inject_system
from alignx.data.templates import NO_TEMPLATE_ID, get_template
from alignx.serve.schemas import EXPERT_PREFIX, Provenance

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from alignx.config import ModelCfg

#: Baseline systems (Serve model ids; deployments ``system-<name>``).
BASELINES = ("base", "multitask", "h3fusion")
#: Prefix of the baselines' Serve deployment names.
SYSTEM_PREFIX = "system-"

#: ``() -> (base model, tokenizer)``: a private ``load_base`` or shared object-store weights.
BaseLoader = Callable[[], "tuple[PreTrainedModel, PreTrainedTokenizerBase]"]


@dataclass(frozen=True)
class LoadedSystem:
    """One system, ready to generate or score.

    Attributes:
        name: ``base``, ``multitask``, ``h3fusion`` or ``expert-<axis>``.
        model: the causal LM in eval mode (forward gives ``logits``; works with ``generate``).
        tokenizer: its tokenizer (with the model's chat template).
        system: text injected as the first system message, or ``None``.
        template_id: id of that text (``none`` when there is none).
        provenance: run and artifact identity (the ``alignx`` object of a response).
    """

    name: str
    model: Any
    tokenizer: Any
    system: str | None
    template_id: str
    provenance: Provenance

    def messages(self, messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
        """The conversation as this system sees it (its system text injected)."""
        if self.system:
            return inject_system(messages, self.system)
        return [dict(m) for m in messages]

    def prompt(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The templated prompt string up to the generation prompt."""
        return self.tokenizer.apply_chat_template(self.messages(messages), tokenize=False,
                                                  add_generation_prompt=True)


def union_system(template_ids: Mapping[str, str], axes: Sequence[Axis]) -> tuple[str, str | None]:
    """The system text of a system that knows no axis: every axis instruction, in axis order.

    Args:
        template_ids: ``{axis: template id}`` the adapters were trained with.
        axes: the axes, in order.

    Returns:
        ``(id, text)``; ``(NO_TEMPLATE_ID, None)`` when the data was prepared without injection.

    Raises:
        ValueError: an axis has no template id.
    """
    missing = [a.value for a in axes if a.value not in template_ids]
    if missing:
        raise ValueError(f"no template id for axes {missing} in {dict(template_ids)}")
    ids = [template_ids[a.value] for a in axes]
    if all(i == NO_TEMPLATE_ID for i in ids):
        return NO_TEMPLATE_ID, None
    texts = [get_template(i).system for i in ids if i != NO_TEMPLATE_ID]
    return "union:" + "+".join(ids), "\n\n".join(texts)


def expert_system(manifest: AdapterManifest) -> tuple[str, str | None]:
    """``(template id, system text)`` an axis expert was trained with (from its manifest).

    Raises:
        ValueError: the manifest records no template id for its axis.
    """
    template_id = manifest.template_ids.get(manifest.name)
    if template_id is None:
        raise ValueError(f"adapter manifest {manifest.name!r} has no template id for its axis")
    return template_id, None if template_id == NO_TEMPLATE_ID else get_template(template_id).system


def parse_system(name: str) -> str:
    """Check a system name; returns it. ``expert-<axis>`` is normalised to the axis value.

    Raises:
        ValueError: an unknown name (lists the valid ones).
    """
    if name in BASELINES:
        return name
    if name.startswith(EXPERT_PREFIX):
        try:
            return f"{EXPERT_PREFIX}{parse_axis(name[len(EXPERT_PREFIX):]).value}"
        except ValueError:
            pass
    raise ValueError(f"unknown system {name!r}; valid: {', '.join(BASELINES)}, "
                     f"{EXPERT_PREFIX}<axis>")


def _provenance(run: str, adapter: str, manifest: Path | None, created_at: str = "",
                config_hash: str = "") -> Provenance:
    return Provenance(run=run, adapter=adapter,
                      manifest_sha256=sha256_file(manifest)[:16] if manifest else "",
                      created_at=created_at, config_hash=config_hash)


def with_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """``model`` with the PEFT LoRA adapter of ``adapter_dir`` applied, frozen: a ``PeftModel``
    for a ``transformers`` model, the same shared weights plus the adapter for a
    :class:`~alignx.serve.npengine.NumpyCausalLM` (the torch-free serving engine).

    Raises:
        UnsupportedModelError: the numpy engine cannot apply this adapter (not plain LoRA).
    """
    from alignx.serve.npengine import NumpyCausalLM, load_lora

    if isinstance(model, NumpyCausalLM):
        return model.with_lora(load_lora(adapter_dir))
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    model.eval()
    return model


def _torch_only(base_loader: BaseLoader | None, name: str) -> None:
    """Refuse a torch-free base loader for a system that needs ``transformers`` modules."""
    if getattr(base_loader, "engine", "torch") != "torch":
        from alignx.serve.npengine import UnsupportedModelError

        raise UnsupportedModelError(f"system {name!r} runs on the torch engine only")


def load_system(
    name: str, run_dir: str | Path, model_cfg: ModelCfg | Mapping[str, Any],
    base_loader: BaseLoader | None = None,
) -> LoadedSystem:
    """Load one system of a run (see the module docstring for what each name is).

    Args:
        name: ``base``, ``multitask``, ``h3fusion`` or ``expert-<axis>``.
        run_dir: the run directory, or the run's URI on shared storage (its finished
            artifacts are then fetched into a local mirror, :func:`alignx.storage.localize`).
        model_cfg: the configured base model (``ModelCfg`` or its dict); artifacts must have
            been made for the same one.
        base_loader: returns a fresh ``(model, tokenizer)``; default ``load_base(model_cfg)``.

    Returns:
        The :class:`LoadedSystem`.

    Raises:
        ValueError: an unknown name.
        ArtifactNotFoundError: the system's artifacts are missing (names the command).
        ArtifactMismatchError: they were made for another base model.
    """
    from alignx.config import ModelCfg
    from alignx.modeling import base_model_id, load_base
    from alignx.storage import is_uri, localize

    name = parse_system(name)
    mcfg = model_cfg if isinstance(model_cfg, ModelCfg) else ModelCfg(**model_cfg)
    run = str(run_dir) if is_uri(run_dir) else str(ArtifactLayout(run_dir).root)

    def base() -> tuple[Any, Any]:
        return base_loader() if base_loader is not None else load_base(mcfg)

    if name == "base":
        model, tok = base()
        return LoadedSystem(name, model, tok, None, NO_TEMPLATE_ID, _provenance(run, "base", None))
    if name == "h3fusion":
        _torch_only(base_loader, name)
        from alignx.baselines.h3fusion import (
            NAME,
            h3fusion_dir,
            load_h3fusion,
            load_h3fusion_manifest,
        )

        local = localize(run_dir, f"baselines/{NAME}")
        axes = load_h3fusion_manifest(local).axes
        localize(run_dir, *(f"adapters/{a.value}" for a in axes))
        model, tok = base()
        model, m = load_h3fusion(local, mcfg, model)
        return LoadedSystem(name, model, tok, m.system or None, m.template_id,
                            _provenance(run, NAME, h3fusion_dir(local) / "manifest.json",
                                        m.created_at, m.config_hash))
    # a PEFT adapter: an axis expert or the multi-task baseline
    adapter = MULTITASK if name == MULTITASK else name[len(EXPERT_PREFIX):]
    layout = ArtifactLayout(localize(run_dir, f"adapters/{adapter}"))
    manifest = layout.load_adapter_manifest(adapter)
    check_same_base(base_model_id(mcfg), manifest.base_model, f"adapter {adapter!r}")
    if name == MULTITASK:
        template_id, system = union_system(manifest.template_ids, manifest.axes)
    else:
        template_id, system = expert_system(manifest)
    model, tok = base()
    model = with_adapter(model, layout.adapter_dir(adapter))
    return LoadedSystem(name, model, tok, system, template_id,
                        _provenance(run, manifest.name, layout.adapter_manifest(adapter),
                                    manifest.created_at, manifest.config_hash))
