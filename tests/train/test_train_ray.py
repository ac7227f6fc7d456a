"""End-to-end training under Ray Train + DeepSpeed on CPU (tiny-llama, a few steps).

* three axes (and the multi-task baseline) train concurrently under ZeRO-2 and publish
  adapters that ``PeftModel.from_pretrained`` loads, with weights that moved from their init;
* under ZeRO-3 with 2 workers (every LoRA tensor partitioned) the saved adapter is complete
  and equal to the weights DeepSpeed's optimizer holds;
* a worker process that dies mid-run is replaced by ``FailureConfig`` and training resumes
  from the last checkpoint at the same data position: the consumed batches and the final
  weights equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignx.artifacts import MULTITASK, ArtifactLayout
from alignx.axes import AXES, Axis
from alignx.config import AlignXConfig
from alignx.train.trainer import train_all, train_axis

from ._tiny_run import tiny_config, write_axis_data

pytestmark = pytest.mark.slow


def _state(cfg: AlignXConfig, name: str) -> dict:
    return json.loads(
        (ArtifactLayout(cfg.run_dir).adapter_dir(name) / "train_state.json").read_text()
    )


def _adapter(cfg: AlignXConfig, name: str) -> dict[str, torch.Tensor]:
    return load_file(
        str(ArtifactLayout(cfg.run_dir).adapter_dir(name) / "adapter_model.safetensors")
    )


def _init_lora(cfg: AlignXConfig) -> dict[str, torch.Tensor]:
    """The LoRA weights before training (same seed as the loop), keyed like the saved file."""
    from peft import get_peft_model, get_peft_model_state_dict

    from alignx.modeling import load_base
    from alignx.train.lora import build_lora_config

    base, _ = load_base(cfg.model, use_gpu=False)
    torch.manual_seed(cfg.seed)
    model = get_peft_model(base, build_lora_config(cfg.train.lora, cfg.model.name))
    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def _expected_keys(cfg: AlignXConfig) -> set[str]:
    from alignx.train.lora import resolve_target_modules

    targets = resolve_target_modules(cfg.train.lora, cfg.model.name)
    mod = {
        "q_proj": "self_attn",
        "k_proj": "self_attn",
        "v_proj": "self_attn",
        "o_proj": "self_attn",
    }
    return {
        f"base_model.model.model.layers.{layer}.{mod[t]}.{t}.lora_{ab}.weight"
        for layer in range(2)
        for t in targets
        for ab in "AB"
    }


def test_three_axes_and_multitask_train_concurrently_zero2(
    ray_local, ds_cpu_ops, run_dir: Path
) -> None:
    from peft import PeftModel

    from alignx.modeling import load_base

    cfg = tiny_config(run_dir)
    # Every trainer waits at the start of its loop until all four have started: run one after
    # another, the first would time out. This is the proof that they run concurrently.
    meet = run_dir / "rendezvous"
    meet.mkdir()
    out = train_all(cfg, multitask=True, hooks={"rendezvous_dir": str(meet), "rendezvous_count": 4})

    assert list(out) == [a.value for a in AXES] + [MULTITASK]
    init = _init_lora(cfg)
    for name, m in out.items():
        assert ArtifactLayout(run_dir).adapter_manifest(name).is_file()
        assert m.base_model == "tiny-llama" and m.zero_stage == 2
        assert m.config_hash == cfg.stage_hash("train")
        assert m.train_tokens > 0 and m.tokens_per_s and m.train_loss is not None
        base, _ = load_base(cfg.model, use_gpu=False)
        model = PeftModel.from_pretrained(base, str(ArtifactLayout(run_dir).adapter_dir(name)))
        loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        assert len(loaded) == len(init) == len(_expected_keys(cfg))
        saved = _adapter(cfg, name)
        assert set(saved) == set(init)
        for k, v in saved.items():
            assert not torch.equal(v, init[k]), f"{name}: {k} did not move from its init"
    experts = [out[a.value] for a in AXES]
    assert all(m.steps == 4 and set(m.eval_loss) == {m.name} for m in experts)
    # Multi-task: one adapter on the union, as many steps as the three experts together.
    mt = out[MULTITASK]
    assert mt.steps == sum(m.steps for m in experts) == 12
    assert set(mt.eval_loss) == {a.value for a in AXES}
    assert set(mt.template_ids) == {a.value for a in AXES}
    # Different data, different adapters.
    a, b = _adapter(cfg, "honesty"), _adapter(cfg, "helpfulness")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # Concurrency: all four checked in at the rendezvous, so all were running at one moment.
    assert sorted(p.name for p in meet.iterdir()) == sorted(out)
    states = [_state(cfg, n) for n in out]
    assert max(s["attempts"][0]["start"] for s in states) < min(s["finished_at"] for s in states)


def test_zero3_two_workers_saves_the_complete_adapter(ray_local, ds_cpu_ops, run_dir: Path) -> None:
    from alignx.train.engine import consolidated_fp32_state_dict

    cfg = tiny_config(
        run_dir, deepspeed={"zero_stage": 3}, scaling={"num_workers": 2, "cpus_per_worker": 0.3}
    )
    # Threshold 0: even the small LoRA tensors are partitioned across the two ranks, so an
    # adapter saved without gathering would be empty.
    m = train_axis(cfg, Axis.HONESTY, hooks={"persistence_threshold": 0})
    assert (m.zero_stage, m.num_workers, m.steps) == (3, 2, 4)

    saved = _adapter(cfg, "honesty")
    assert set(saved) == _expected_keys(cfg)
    r = cfg.train.lora.rank
    for k, v in saved.items():
        assert v.numel() > 0 and v.dim() == 2, k
        assert (v.shape[0] if ".lora_A." in k else v.shape[1]) == r, (k, v.shape)
        assert torch.isfinite(v).all(), k

    # The trained weights, rebuilt offline from both ranks' ZeRO partitions of the last checkpoint.
    ckpts = sorted(p for p in Path(m.ray_run).glob("checkpoint_*") if p.is_dir())
    final = ckpts[-1]
    assert json.loads((final / "train_state.json").read_text())["global_step"] == 4
    trained = consolidated_fp32_state_dict(final)
    trained = {k.replace(".default.", "."): v for k, v in trained.items()}
    assert set(trained) == set(saved)
    for k, v in saved.items():
        assert torch.equal(v, trained[k].to(v.dtype)), f"{k} differs from the trained weights"
    init = _init_lora(cfg)
    assert all(not torch.equal(saved[k], init[k]) for k in saved)


def test_worker_failure_resumes_at_the_same_data_position(
    ray_local, ds_cpu_ops, tmp_path: Path
) -> None:
    runs = {}
    for name in ("clean", "crash"):
        d = tmp_path / name
        write_axis_data(d, Axis.HONESTY, {"train": 16, "validation": 4})
        runs[name] = tiny_config(d, optim={"max_steps": 6}, checkpoint_every=2, max_failures=1)
    marker = tmp_path / "crashed-once"
    # The crash run's worker process exits hard a moment after step 3 (checkpoint at step 2;
    # the delay lets Ray Train's controller register that checkpoint, see the loop's hook).
    crash = {"fail_once_at_step": 3, "fail_marker": str(marker), "fail_delay_s": 3.0}
    hooks = {"clean": None, "crash": crash}
    with ThreadPoolExecutor(2) as pool:
        futures = {
            n: pool.submit(train_axis, c, Axis.HONESTY, hooks=hooks[n]) for n, c in runs.items()
        }
        manifests = {n: f.result() for n, f in futures.items()}

    assert marker.read_text() == "3", "the failure hook did not fire"
    clean, crash = (_state(runs[n], "honesty") for n in ("clean", "crash"))
    # The crash run was restarted once, from the step-2 checkpoint ...
    assert [a["from_step"] for a in crash["attempts"]] == [0, 2]
    assert [a["from_step"] for a in clean["attempts"]] == [0]
    # ... and consumed exactly the batches of the uninterrupted run: none repeated, none skipped.
    seq = [(h["step"], h["epoch"], tuple(h["batches"])) for h in clean["history"]]
    assert [(h["step"], h["epoch"], tuple(h["batches"])) for h in crash["history"]] == seq
    assert [s for s, _, _ in seq] == [1, 2, 3, 4, 5, 6]
    assert manifests["crash"].steps == manifests["clean"].steps == 6 == crash["global_step"]
    # Optimizer, scheduler and RNG came back too: the final adapters agree.
    a, b = _adapter(runs["clean"], "honesty"), _adapter(runs["crash"], "honesty")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert [h["lr"] for h in crash["history"]] == [h["lr"] for h in clean["history"]]
