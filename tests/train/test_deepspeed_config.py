"""The DeepSpeed config builder: batch arithmetic, ZeRO stages, precision, no "auto" left."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import torch

from alignx.config import TrainCfg
from alignx.train.deepspeed import DEFAULT_PERSISTENCE_THRESHOLD, build_deepspeed_config


def _train(**sections: dict[str, Any]) -> TrainCfg:
    return TrainCfg.model_validate(sections)


def _walk(obj: Any):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)
    else:
        yield obj


@pytest.mark.parametrize(("micro", "accum", "world"), [(1, 1, 1), (4, 1, 2), (2, 8, 4), (3, 5, 7)])
def test_batch_arithmetic(micro: int, accum: int, world: int) -> None:
    cfg = build_deepspeed_config(
        _train(optim={"micro_batch_size": micro, "grad_accum": accum}), world, torch.float32
    )
    assert cfg["train_micro_batch_size_per_gpu"] == micro
    assert cfg["gradient_accumulation_steps"] == accum
    assert cfg["train_batch_size"] == micro * accum * world


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_settings(stage: int) -> None:
    cfg = build_deepspeed_config(_train(deepspeed={"zero_stage": stage}), 2, "float32")
    zero = cfg["zero_optimization"]
    assert zero["stage"] == stage
    stage3_keys = {k for k in zero if k.startswith("stage3_")}
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
        assert zero["stage3_param_persistence_threshold"] == DEFAULT_PERSISTENCE_THRESHOLD
    else:
        assert not stage3_keys
    assert "offload_optimizer" not in zero


def test_persistence_threshold_override() -> None:
    cfg = build_deepspeed_config(
        _train(deepspeed={"zero_stage": 3}), 2, "float32", persistence_threshold=0
    )
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 0


@pytest.mark.parametrize(
    ("dtype", "bf16"), [(torch.float32, False), (torch.bfloat16, True), ("bfloat16", True)]
)
def test_precision(dtype: Any, bf16: bool) -> None:
    cfg = build_deepspeed_config(_train(), 1, dtype)
    assert cfg["bf16"] == {"enabled": bf16}
    assert cfg["fp16"] == {"enabled": False}


def test_float16_is_refused() -> None:
    with pytest.raises(ValueError, match="model.dtype"):
        build_deepspeed_config(_train(), 1, torch.float16)


def test_optimizer_and_clipping_from_config() -> None:
    cfg = build_deepspeed_config(
        _train(
            optim={"lr": 3e-4, "weight_decay": 0.1},
            deepspeed={"torch_adam": True, "gradient_clipping": 0.5},
        ),
        1,
        torch.float32,
    )
    assert cfg["optimizer"]["type"] == "AdamW"
    params = cfg["optimizer"]["params"]
    assert (params["lr"], params["weight_decay"], params["torch_adam"]) == (3e-4, 0.1, True)
    assert cfg["gradient_clipping"] == 0.5
    assert "zero_force_ds_cpu_optimizer" not in cfg


def test_offload_optimizer() -> None:
    cfg = build_deepspeed_config(
        _train(deepspeed={"zero_stage": 2, "offload_optimizer": True, "torch_adam": False}),
        1,
        torch.float32,
    )
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["optimizer"]["params"]["torch_adam"] is False
    # torch AdamW on offloaded partitions needs DeepSpeed's CPU-optimizer check turned off.
    cpu = build_deepspeed_config(
        _train(deepspeed={"zero_stage": 2, "offload_optimizer": True, "torch_adam": True}),
        1,
        torch.float32,
    )
    assert cpu["zero_force_ds_cpu_optimizer"] is False


def test_offload_needs_zero() -> None:
    with pytest.raises(ValueError, match="zero_stage"):
        build_deepspeed_config(
            _train(deepspeed={"zero_stage": 0, "offload_optimizer": True}), 1, torch.float32
        )


def test_bad_world_size() -> None:
    with pytest.raises(ValueError, match="world_size"):
        build_deepspeed_config(_train(), 0, torch.float32)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("offload", [False, True])
def test_no_auto_left_and_json_serialisable(stage: int, offload: bool) -> None:
    if offload and stage == 0:
        pytest.skip("offload needs ZeRO")
    cfg = build_deepspeed_config(
        _train(deepspeed={"zero_stage": stage, "offload_optimizer": offload}), 3, torch.bfloat16
    )
    assert not [v for v in _walk(cfg) if isinstance(v, str) and v.lower() == "auto"]
    assert json.loads(json.dumps(cfg)) == cfg


def test_builder_does_not_import_deepspeed() -> None:
    code = (
        "import sys, torch\n"
        "from alignx.config import TrainCfg\n"
        "from alignx.train.deepspeed import build_deepspeed_config\n"
        "build_deepspeed_config(TrainCfg(), 2, torch.float32)\n"
        "assert 'deepspeed' not in sys.modules, 'deepspeed was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_interpreters_tools_come_first_on_path(monkeypatch) -> None:
    import os
    import sys
    from pathlib import Path

    from alignx.train import engine

    tools = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", tools, "/bin"]))
    engine._interpreter_tools_first()
    assert os.environ["PATH"].split(os.pathsep) == [tools, "/usr/bin", "/bin"]
    engine._interpreter_tools_first()  # already first: unchanged
    assert os.environ["PATH"].split(os.pathsep) == [tools, "/usr/bin", "/bin"]
