"""Stage 1 (train): the DeepSpeed configuration of an axis trainer, as plain data.

:func:`build_deepspeed_config` turns our ``train`` section into the dict that
``deepspeed.initialize(config=...)`` takes (OpenRLHF style). It is pure: it never imports
deepspeed, resolves every value itself (no ``"auto"`` placeholder survives, unlike the
Hugging Face integration's templates) and is unit-tested on CPU.

Choices that matter:

* batch arithmetic: ``train_batch_size = micro_batch_size * grad_accum * world_size``;
* ZeRO-2 is the LoRA default (few trainable parameters; the frozen base is replicated);
  under ZeRO-3 every parameter may be partitioned, so adapters are saved from gathered
  parameters (:mod:`alignx.train.engine`); ``stage3_gather_16bit_weights_on_model_save`` makes
  DeepSpeed's own ``save_16bit_model`` produce full weights too;
* the optimizer is DeepSpeed's AdamW; ``torch_adam`` selects ``torch.optim.AdamW`` inside it,
  which avoids the ~50 s JIT compile of ``fused_adam`` on CPU (ENVIRONMENT.md);
* mixed precision: bf16 only when the weights are bfloat16; fp16 is never enabled (LoRA in
  fp16 needs loss scaling, which this project does not support).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from alignx.config import TrainCfg

#: DeepSpeed's own default for ``stage3_param_persistence_threshold``: parameters with fewer
#: elements stay whole on every rank. Tests lower it to 0 so that every LoRA tensor is partitioned.
DEFAULT_PERSISTENCE_THRESHOLD = 100_000


def _dtype_name(dtype: torch.dtype | str) -> str:
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unsupported training dtype {dtype!r}: use float32 or bfloat16")
    return name


def build_deepspeed_config(
    train_cfg: TrainCfg,
    world_size: int,
    dtype: torch.dtype | str,
    *,
    persistence_threshold: int = DEFAULT_PERSISTENCE_THRESHOLD,
) -> dict[str, Any]:
    """Build the DeepSpeed config dict of one trainer.

    Args:
        train_cfg: the ``train`` section (``deepspeed``, ``optim`` and ``scaling`` are read).
        world_size: number of data-parallel workers (``train.scaling.num_workers``).
        dtype: the dtype the base weights are loaded in (``torch.float32`` on CPU,
            ``torch.bfloat16`` on GPU with ``model.dtype: auto``); also accepts its name.
        persistence_threshold: ZeRO-3 only: parameters with fewer elements than this are not
            partitioned (DeepSpeed's default; tests use 0 to partition even LoRA tensors).

    Returns:
        A JSON-serialisable dict for ``deepspeed.initialize(config=...)``.

    Raises:
        ValueError: ``world_size < 1``; ``float16`` weights; ``offload_optimizer`` with ZeRO
            stage 0 (offload needs a ZeRO-partitioned optimizer).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    dtype_name = _dtype_name(dtype)
    if dtype_name == "float16":
        raise ValueError(
            "float16 training is not supported (no loss scaling): set model.dtype to "
            "bfloat16 (GPU) or float32"
        )
    ds, optim = train_cfg.deepspeed, train_cfg.optim
    stage = ds.zero_stage

    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=train_cfg.scaling.use_gpu)
    if stage == 3:
        zero.update(
            stage3_gather_16bit_weights_on_model_save=True,
            stage3_param_persistence_threshold=int(persistence_threshold),
            stage3_max_live_parameters=1_000_000_000,
            stage3_max_reuse_distance=1_000_000_000,
            stage3_prefetch_bucket_size=50_000_000,
        )
    if ds.offload_optimizer:
        if stage == 0:
            raise ValueError(
                "train.deepspeed.offload_optimizer=true needs ZeRO: set "
                "train.deepspeed.zero_stage to 1, 2 or 3"
            )
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train_cfg.scaling.use_gpu}

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": optim.micro_batch_size,
        "gradient_accumulation_steps": optim.grad_accum,
        "train_batch_size": optim.micro_batch_size * optim.grad_accum * world_size,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": optim.weight_decay,
                "torch_adam": ds.torch_adam,
            },
        },
        "bf16": {"enabled": dtype_name == "bfloat16"},
        "fp16": {"enabled": False},
        # Progress is logged by the loop; keep DeepSpeed's own step printing out of the way.
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer and ds.torch_adam:
        # torch AdamW on the offloaded (CPU) fp32 partitions instead of the compiled cpu_adam.
        config["zero_force_ds_cpu_optimizer"] = False
    return config
