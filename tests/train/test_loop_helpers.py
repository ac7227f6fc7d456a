"""Pure pieces of the training loop: step planning, data order, LR schedule, held-out loss,
resume bookkeeping, and the multi-task step budget. No Ray, no DeepSpeed."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from alignx.config import OptimCfg
from alignx.train.loop import (
    TrainState,
    answer_nll,
    epoch_order,
    heldout_answer_loss,
    lr_multiplier,
    micro_batch,
    plan_steps,
    warmup_steps,
)
from alignx.train.trainer import multitask_step_budget

from ._tiny_run import tiny_config


def test_plan_steps_caps_epochs_with_max_steps() -> None:
    optim = OptimCfg(micro_batch_size=2, grad_accum=1, epochs=1, max_steps=4)
    assert plan_steps(16, optim, 1) == (8, 4)
    assert plan_steps(17, OptimCfg(micro_batch_size=2, epochs=3), 1) == (8, 24)
    assert plan_steps(16, OptimCfg(micro_batch_size=2, grad_accum=2, epochs=2), 2) == (2, 4)


def test_plan_steps_budget_overrides_epochs() -> None:
    optim = OptimCfg(micro_batch_size=2, epochs=1, max_steps=4)
    assert plan_steps(48, optim, 1, budget=30) == (24, 30)


def test_plan_steps_too_little_data_names_the_keys() -> None:
    with pytest.raises(ValueError, match="micro_batch_size.*num_workers.*grad_accum"):
        plan_steps(3, OptimCfg(micro_batch_size=2), 2)


def test_epoch_order_is_a_seeded_permutation() -> None:
    a = epoch_order(20, seed=0, epoch=0)
    assert sorted(a) == list(range(20))
    assert a == epoch_order(20, seed=0, epoch=0)
    assert a != epoch_order(20, seed=0, epoch=1)
    assert a != epoch_order(20, seed=1, epoch=0)


def test_micro_batches_partition_an_epoch_across_ranks() -> None:
    n, micro, world = 23, 2, 3
    order = epoch_order(n, 0, 0)
    n_batches = n // (micro * world)
    seen = [
        i
        for b in range(n_batches)
        for r in range(world)
        for i in micro_batch(order, b, micro, world, r)
    ]
    assert len(seen) == len(set(seen)) == n_batches * micro * world
    assert seen == order[: len(seen)]


def test_lr_schedule() -> None:
    total, warm = 10, warmup_steps(10, 0.2)
    assert warm == 2
    f = [lr_multiplier(s, total, warm) for s in range(total)]
    assert f[0] > 0 and f[-1] > 0, "every step must train"
    assert f[0] < f[1] < f[2] == 1.0
    assert all(a > b for a, b in zip(f[2:], f[3:], strict=False))
    assert [lr_multiplier(s, 4, 0) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_answer_nll_matches_the_model_loss() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)  # (B, T, V)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 2, -100, -100]])
    s, n = answer_nll(logits, labels)
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert n == 5
    assert s / n == pytest.approx(float(ref), rel=1e-6)


class _Fixed(torch.nn.Module):
    """A 'model' whose logits do not depend on the input: loss is easy to compute by hand."""

    def __init__(self, vocab: int = 5) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(
            torch.log_softmax(torch.arange(vocab, dtype=torch.float), 0)
        )

    def forward(self, input_ids, attention_mask):  # noqa: ANN001
        out = type("Out", (), {})()
        out.logits = self.logits.expand(*input_ids.shape, -1)
        return out


def test_heldout_answer_loss_is_per_response_token() -> None:
    model = _Fixed()
    examples = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [1, 4], "labels": [-100, 4]},
        {"input_ids": [1, 0, 0, 1], "labels": [-100, -100, 0, 1]},
    ]
    logp = model.logits.detach()
    want = -(logp[2] + logp[3] + logp[4] + logp[0] + logp[1]) / 5
    got = heldout_answer_loss(model, examples, 2, pad_id=0, max_batches=None, rank=0, world_size=1)
    assert got == pytest.approx(float(want), rel=1e-6)
    first = heldout_answer_loss(model, examples, 2, pad_id=0, max_batches=1, rank=0, world_size=1)
    assert first == pytest.approx(float(-(logp[2] + logp[3] + logp[4]) / 3), rel=1e-6)
    assert heldout_answer_loss(model, [], 2, 0, None, 0, 1) != heldout_answer_loss(
        model, [], 2, 0, None, 0, 1
    )


def test_train_state_resume_continues_the_sequence(tmp_path: Path) -> None:
    def run(state: TrainState, steps: int) -> list[tuple[int, int]]:
        out = []
        for _ in range(steps):
            out.append((state.epoch, state.step_in_epoch))
            state.advance()
        return out

    full = run(TrainState("a", ["honesty"], "h", {}, total_steps=7, steps_per_epoch=3), 7)
    first = TrainState("a", ["honesty"], "h", {}, total_steps=7, steps_per_epoch=3)
    head = run(first, 4)
    (tmp_path / "s.json").write_text(json.dumps(asdict(first)))
    tail = run(TrainState.load(tmp_path / "s.json"), 3)
    assert head + tail == full == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]


def test_multitask_budget_is_the_sum_of_the_experts(run_dir: Path) -> None:
    cfg = tiny_config(run_dir)  # 16 train rows per axis, micro 2, max_steps 4
    assert multitask_step_budget(cfg) == 3 * 4
    uncapped = tiny_config(run_dir, optim={"max_steps": None, "epochs": 2})
    assert multitask_step_budget(uncapped) == 3 * 2 * 8
