"""Stage 1 (train): the DeepSpeed engine of a Ray Train worker (the only ``import deepspeed``).

The same code runs on a GPU cluster (CUDA accelerator + NCCL) and in CI on CPU (DeepSpeed's CPU
accelerator + gloo, ENVIRONMENT.md). Ray Train has already created the torch process group and
set ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` when the loop calls :func:`init_engine`, so DeepSpeed
is told not to initialise distributed itself (``dist_init_required=False``).

ZeRO-3 partitions parameters across ranks: outside a forward pass each rank holds only a
slice, so reading ``param.data`` there yields an empty tensor (the empty-adapter bug seen in
other frameworks). :func:`trainable_state_dict` gathers the trainable (LoRA) parameters with
``deepspeed.zero.GatheredParameters`` first; it is a collective, so every rank calls it.
Training state (LoRA weights, optimizer moments, LR scheduler, step counters) is saved and
restored with DeepSpeed's own per-rank checkpoint files, frozen base weights excluded.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from alignx._optional import require

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

#: Tag of the DeepSpeed checkpoint inside a Ray Train checkpoint directory.
DS_TAG = "state"


def _interpreter_tools_first() -> None:
    """Put this interpreter's ``bin/`` (the venv's ``ninja``) first on PATH.

    DeepSpeed JIT-builds its ops with whichever ``ninja`` PATH finds. Two ninja versions (the
    venv's pip ``ninja`` and a system one) each read the other's build log as stale, so a
    process whose PATH lacks the venv would rebuild the CPU comm op (~25 s, measured), and the
    next one would rebuild it back. Pinning the venv's makes every process agree.
    """
    tools = str(Path(sys.executable).parent)
    parts = os.environ.get("PATH", "").split(os.pathsep)
    if parts[:1] != [tools]:
        os.environ["PATH"] = os.pathsep.join([tools, *(p for p in parts if p != tools)])


def _import_deepspeed(use_gpu: bool | None = None) -> Any:
    # The accelerator is chosen once, at DeepSpeed's first use; pin it before the import so a
    # CPU worker never probes for CUDA (and a GPU worker never falls back to CPU silently).
    if use_gpu is None:
        use_gpu = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    _interpreter_tools_first()
    return require("deepspeed")


def init_engine(
    model: torch.nn.Module,
    ds_config: dict[str, Any],
    params: Iterable[torch.nn.Parameter],
    *,
    use_gpu: bool = False,
    device_index: int | None = None,
    lr_lambda: Callable[[int], float] | None = None,
) -> DeepSpeedEngine:
    """Wrap ``model`` in a DeepSpeed engine inside an already-initialised process group.

    Args:
        model: the PEFT model (frozen base + trainable LoRA parameters).
        ds_config: from :func:`alignx.train.deepspeed.build_deepspeed_config`; its
            ``optimizer`` section builds the optimizer over ``params``.
        params: the parameters to optimise (the LoRA ones).
        use_gpu: CUDA accelerator (NCCL) instead of the CPU accelerator (gloo).
        device_index: the CUDA device of this worker (``ray.train.torch.get_device().index``);
            by default DeepSpeed uses ``cuda:LOCAL_RANK``.
        lr_lambda: multiplier of the base LR as a function of the optimizer step, wrapped in a
            ``torch.optim.lr_scheduler.LambdaLR`` that the engine steps and checkpoints.

    Returns:
        The engine; call ``engine(**batch)``, ``engine.backward(loss)``, ``engine.step()``.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised or ``LOCAL_RANK`` is unset
            (run inside a Ray Train worker, which sets both).
        ImportError: deepspeed is not installed (names the install command).
    """
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise RuntimeError(
            "init_engine needs torch.distributed initialised: call it inside a Ray Train worker "
            "(TorchTrainer sets up the process group)"
        )
    if "LOCAL_RANK" not in os.environ:
        raise RuntimeError("LOCAL_RANK is not set; Ray Train sets it for every training worker")
    deepspeed = _import_deepspeed(use_gpu)

    def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda or (lambda _: 1.0))

    # DeepSpeed reads only ``device_rank`` (and sets ``local_rank``) on this namespace.
    args = (
        SimpleNamespace(device_rank=device_index) if use_gpu and device_index is not None else None
    )
    engine, _, _, _ = deepspeed.initialize(
        args=args,
        model=model,
        model_parameters=list(params),
        config=ds_config,
        lr_scheduler=scheduler,
        dist_init_required=False,
    )
    return engine


def trainable_state_dict(engine: DeepSpeedEngine) -> dict[str, torch.Tensor]:
    """Full (gathered) copies of the trainable parameters, keyed like ``module.state_dict()``.

    Under ZeRO-3 the parameters are all-gathered first, so this is a collective: every rank
    must call it (each gets the full tensors). Under ZeRO 0-2 parameters are whole on every
    rank and this is a plain copy.

    Args:
        engine: the engine from :func:`init_engine`.

    Returns:
        ``{name: tensor}`` on CPU, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.
        lora_A.default.weight -> (r, d_in)``.
    """
    deepspeed = _import_deepspeed()
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(
        [p for _, p in named], modifier_rank=None, enabled=engine.zero_optimization_stage() == 3
    ):
        return {n: p.detach().to("cpu", copy=True) for n, p in named}


def save_engine_state(engine: DeepSpeedEngine, directory: str | Path) -> None:
    """Save this rank's share of the training state (a collective: every rank calls it).

    Writes ``<directory>/<DS_TAG>/`` with DeepSpeed's per-rank files (optimizer partitions,
    LR scheduler, step counters, trainable weights); frozen base weights are excluded.

    Args:
        engine: the engine.
        directory: this worker's local checkpoint folder.
    """
    engine.save_checkpoint(str(directory), tag=DS_TAG, exclude_frozen_parameters=True)


def load_engine_state(engine: DeepSpeedEngine, directory: str | Path) -> None:
    """Restore what :func:`save_engine_state` wrote (a collective: every rank calls it).

    The data-parallel world size must equal the one that saved (Ray Train restarts the same
    number of workers).

    Args:
        engine: a freshly initialised engine with the same model, config and world size.
        directory: a checkpoint folder holding ``<DS_TAG>/`` with every rank's files.

    Raises:
        FileNotFoundError: no DeepSpeed checkpoint under ``directory``.
    """
    if not (Path(directory) / DS_TAG).is_dir():
        raise FileNotFoundError(f"no DeepSpeed checkpoint {DS_TAG!r} under {directory}")
    path, _ = engine.load_checkpoint(
        str(directory),
        tag=DS_TAG,
        load_module_strict=False,  # the frozen base weights are not in the checkpoint
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint under {directory}")


def consolidated_fp32_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """Rebuild the full fp32 trainable weights from a saved checkpoint, offline (zero_to_fp32).

    An independent path to the trained weights: it reads every rank's ZeRO partition files
    and merges them, without an engine or a process group. Used to check that an exported
    adapter equals what the optimizer holds.

    Args:
        directory: a checkpoint folder holding ``<DS_TAG>/`` (as written by
            :func:`save_engine_state`).

    Returns:
        ``{name: tensor}`` for the trainable parameters.
    """
    _import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(
        get_fp32_state_dict_from_zero_checkpoint(
            str(directory), tag=DS_TAG, exclude_frozen_parameters=True
        )
    )


def prebuild_cpu_ops() -> None:
    """JIT-compile DeepSpeed's CPU shared-memory comm op once (~30 s, cached on disk).

    Call it before starting several CPU trainers at once, so their workers do not all wait on
    the same compile (CI does this once; see ENVIRONMENT.md).
    """
    _import_deepspeed(use_gpu=False)
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder("ShareMemCommBuilder").load()
