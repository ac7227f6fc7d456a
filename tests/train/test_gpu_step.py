"""A real bf16 DeepSpeed training step on CUDA (``pytest -m gpu``; skipped without a GPU).

The CPU suite trains in float32 on DeepSpeed's CPU accelerator, so the GPU path of the
trainer (``model.dtype: auto`` -> bfloat16, ``bf16.enabled`` in the DeepSpeed config, the
CUDA accelerator on NCCL) is only exercised here. The test runs the worker's own code path
without Ray: :func:`alignx.modeling.load_base` (tiny-llama) -> LoRA
(:func:`alignx.train.lora.build_lora_config`) -> :func:`alignx.train.deepspeed.build_deepspeed_config`
-> :func:`alignx.train.engine.init_engine` in a one-rank NCCL process group, then a few
optimizer steps on batches made by the loop's own tokenize/collate helpers.
"""

from __future__ import annotations

import math
import socket
import sys
from pathlib import Path

import pytest
import torch

from ._tiny_run import tiny_config

pytestmark = pytest.mark.gpu

STEPS = 3

_TOPICS = ["the sea", "bread", "a bicycle", "the moon"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def nccl_rank0():
    """A one-rank NCCL process group on cuda:0 with the variables Ray Train would set, and
    DeepSpeed's CUDA accelerator (tests/conftest.py pins the CPU one for the CPU suite).

    One group for the whole module: DeepSpeed caches the process groups it derives from the
    first one (``deepspeed.utils.groups``), so a second ``init_process_group`` in the same
    process would leave it holding groups of a destroyed one.
    """
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "DS_ACCELERATOR": "cuda",
        }.items():
            mp.setenv(key, value)
        previous, switched = None, False
        if "deepspeed" in sys.modules:
            # An earlier test of this process already chose DeepSpeed's (CPU) accelerator:
            # switch it to CUDA for this module and back afterwards.
            from deepspeed.accelerator import real_accelerator

            previous = real_accelerator.ds_accelerator
            if previous is not None and previous.device_name() != "cuda":
                from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

                real_accelerator.set_accelerator(CUDA_Accelerator())
                switched = True
        torch.cuda.set_device(0)
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
        try:
            yield
        finally:
            torch.distributed.destroy_process_group()
            torch.cuda.empty_cache()
            if switched:
                from deepspeed.accelerator import real_accelerator

                real_accelerator.ds_accelerator = previous


def _frozen_state(engine) -> dict[str, torch.Tensor]:
    """CPU copies of the frozen (base) parameters, gathered first under ZeRO-3."""
    import deepspeed

    named = [(n, p) for n, p in engine.module.named_parameters() if not p.requires_grad]
    with deepspeed.zero.GatheredParameters(
        [p for _, p in named], modifier_rank=None, enabled=engine.zero_optimization_stage() == 3
    ):
        return {n: p.detach().to("cpu", copy=True) for n, p in named}


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_bf16_deepspeed_lora_step(nccl_rank0, tmp_path: Path, zero_stage: int) -> None:
    from peft import get_peft_model

    from alignx.data.tokenize import encode_sft
    from alignx.modeling import load_base, resolve_dtype
    from alignx.train.deepspeed import build_deepspeed_config
    from alignx.train.engine import init_engine, trainable_state_dict
    from alignx.train.loop import collate_examples
    from alignx.train.lora import build_lora_config

    cfg = tiny_config(
        tmp_path,
        deepspeed={"zero_stage": zero_stage, "torch_adam": True},  # no fused_adam JIT build
        scaling={"num_workers": 1, "use_gpu": True},
    )
    tc = cfg.train
    assert cfg.model.dtype == "auto"

    # --- the worker's model path: load_base + LoRA, dtype resolved for a GPU worker
    dtype = resolve_dtype(cfg.model.dtype, use_gpu=True)
    assert dtype == torch.bfloat16
    model, tokenizer = load_base(cfg.model, use_gpu=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    torch.manual_seed(cfg.seed)
    model = get_peft_model(model, build_lora_config(tc.lora, cfg.model.name))
    model.train()

    ds_config = build_deepspeed_config(
        tc,
        tc.scaling.num_workers,
        dtype,
        persistence_threshold=0,  # ZeRO-3: partition LoRA too
    )
    assert ds_config["bf16"] == {"enabled": True}
    assert ds_config["fp16"] == {"enabled": False}
    assert ds_config["zero_optimization"]["stage"] == zero_stage
    assert ds_config["optimizer"]["params"]["torch_adam"] is True

    engine = init_engine(
        model,
        ds_config,
        [p for p in model.parameters() if p.requires_grad],
        use_gpu=True,
        device_index=0,
    )
    try:
        assert engine.bfloat16_enabled() and not engine.fp16_enabled()
        assert engine.zero_optimization_stage() == zero_stage
        assert engine.device == torch.device("cuda", 0)
        trainable = [p for p in engine.module.parameters() if p.requires_grad]
        assert trainable and all(
            "lora_" in n for n, p in engine.module.named_parameters() if p.requires_grad
        )
        # every parameter (frozen base and LoRA) is bf16 on the GPU
        assert {p.dtype for p in engine.module.parameters()} == {torch.bfloat16}
        assert {p.device.type for p in engine.module.parameters()} == {"cuda"}

        # --- a batch made the way the loop makes it (chat template, response-only labels)
        examples = [
            encode_sft(
                [{"role": "user", "content": f"Give me a tip about {t}."}],
                f"Here is a useful tip about {t}: start small, be kind.",
                tokenizer,
                cfg.model.max_seq_len,
            )
            for t in _TOPICS
        ]
        mb = tc.optim.micro_batch_size

        # the output dtype of the first adapted projection (LoRA + frozen base) in each forward
        seen: list[torch.dtype] = []
        q_proj = next(
            m
            for n, m in engine.module.named_modules()
            if n.endswith("q_proj") and hasattr(m, "lora_A")
        )
        handle = q_proj.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))

        lora_before = trainable_state_dict(engine)
        frozen_before = _frozen_state(engine)
        assert all(torch.count_nonzero(v) == 0 for n, v in lora_before.items() if "lora_B" in n)

        losses: list[float] = []
        for step in range(STEPS):
            idx = [(step * mb + i) % len(examples) for i in range(mb)]
            batch = {
                k: v.to(engine.device)
                for k, v in collate_examples(examples, idx, tokenizer.pad_token_id).items()
            }
            out = engine(**batch)
            assert out.logits.dtype == torch.bfloat16
            engine.backward(out.loss)
            engine.step()
            losses.append(out.loss.item())
        handle.remove()

        assert seen and set(seen) == {torch.bfloat16}, seen
        assert all(math.isfinite(x) for x in losses), losses
        assert engine.global_steps == STEPS

        lora_after = trainable_state_dict(engine)
        assert lora_after.keys() == lora_before.keys()
        unchanged = [n for n in lora_before if torch.equal(lora_before[n], lora_after[n])]
        assert not unchanged, f"LoRA tensors not updated: {unchanged}"
        assert all(torch.isfinite(v.float()).all() for v in lora_after.values())

        frozen_after = _frozen_state(engine)
        assert frozen_after.keys() == frozen_before.keys() and frozen_before
        changed = [n for n in frozen_before if not torch.equal(frozen_before[n], frozen_after[n])]
        assert not changed, f"frozen base weights changed: {changed}"
        print(f"zero_stage={zero_stage} losses={[round(x, 4) for x in losses]}")
    finally:
        engine.destroy()
