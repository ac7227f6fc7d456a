"""Stage 1 (train): what every Ray Train worker runs, read top to bottom.

:func:`train_loop_per_worker` goes through commented phases, torchtune-recipe style:
config -> threads -> model + LoRA -> data -> engine -> resume -> epochs (report + checkpoint)
-> held-out eval -> final report. :mod:`alignx.train.trainer` launches it with
``TorchTrainer``; the pure helpers above it (step planning, data order, LR schedule,
held-out loss) are unit-tested without Ray.

**Exact resume.** The order of the data is a pure function of ``(seed, epoch)``: each epoch
is a seeded permutation of the training examples, cut into *global micro-batches* of
``micro_batch_size * world_size`` examples (rank ``r`` takes slice ``r``), and optimizer step
``s`` of an epoch consumes global micro-batches ``s * grad_accum ... (s + 1) * grad_accum - 1``.
A checkpoint stores the *next* position ``(epoch, step_in_epoch)`` and ``global_step`` next to
DeepSpeed's state (LoRA weights, optimizer moments, LR scheduler), and the RNG is re-seeded
from ``(seed, global_step, rank)`` before every step, so a run restarted from a checkpoint
continues with exactly the batch the interrupted run would have taken next, and nothing else.
Every step's ``(epoch, batch indices)`` is recorded in the checkpoint's ``train_state.json``
(``history``), which the tests compare against an uninterrupted run.

**Checkpoint layout** (one Ray Train checkpoint; every worker reports its own folder and Ray
merges them)::

    adapter/            rank 0: PEFT adapter (adapter_config.json + adapter_model.safetensors),
                        saved from the gathered LoRA weights (complete under ZeRO-3 too)
    train_state.json    rank 0: position, counters, per-step history, template ids
    state/              every rank: DeepSpeed's per-rank files (its optimizer partition, the
                        trainable weights, LR scheduler, counters; frozen base excluded)
    latest, zero_to_fp32.py, zero_to_torch.py    DeepSpeed's own (rank 0)

Only rank 0 writes the adapter and the state; the DeepSpeed folder needs every rank's share
because ZeRO partitions the optimizer state across ranks (gathering it onto rank 0 would undo
ZeRO and DeepSpeed reloads it per rank anyway).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from alignx import envs
from alignx.artifacts import write_json_atomic
from alignx.axes import Axis
from alignx.config import AlignXConfig, OptimCfg

if TYPE_CHECKING:
    from collections.abc import Sequence

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"
ADAPTER_SUBDIR = "adapter"
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- pure helpers


def plan_steps(
    n_examples: int, optim: OptimCfg, world_size: int, budget: int | None = None
) -> tuple[int, int]:
    """How many optimizer steps an epoch has and how many the run takes.

    Args:
        n_examples: training examples (after encoding).
        optim: the ``train.optim`` section.
        world_size: data-parallel workers.
        budget: an exact step count that overrides ``epochs``/``max_steps`` (the multi-task
            baseline's share, see :func:`alignx.train.trainer.train_multitask`); the loop then
            runs as many epochs as it needs.

    Returns:
        ``(steps_per_epoch, total_steps)``; without a budget, ``total_steps`` is
        ``epochs * steps_per_epoch`` capped by ``max_steps``.

    Raises:
        ValueError: fewer examples than one optimizer step needs.
    """
    examples_per_step = optim.micro_batch_size * world_size * optim.grad_accum
    steps_per_epoch = n_examples // examples_per_step
    if steps_per_epoch < 1:
        raise ValueError(
            f"{n_examples} training example(s) cannot fill one optimizer step of "
            f"{examples_per_step} (train.optim.micro_batch_size={optim.micro_batch_size} x "
            f"train.scaling.num_workers={world_size} x train.optim.grad_accum={optim.grad_accum}): "
            "lower those or raise data.max_train_per_axis"
        )
    if budget is not None:
        return steps_per_epoch, budget
    total = optim.epochs * steps_per_epoch
    if optim.max_steps is not None:
        total = min(total, optim.max_steps)
    return steps_per_epoch, total


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """The seeded permutation of example indices for ``epoch`` (identical on every rank)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_examples, generator=g).tolist()


def micro_batch(
    order: Sequence[int], batch_index: int, micro_batch_size: int, world_size: int, rank: int
) -> list[int]:
    """Example indices of ``rank``'s share of global micro-batch ``batch_index``.

    Global micro-batch ``b`` is ``order[b*M*W : (b+1)*M*W]`` (``M`` micro batch, ``W`` world
    size); rank ``r`` takes its ``r``-th slice of ``M`` examples.
    """
    start = (batch_index * world_size + rank) * micro_batch_size
    return list(order[start : start + micro_batch_size])


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Number of warmup steps: ``ceil(warmup_ratio * total_steps)``."""
    return math.ceil(warmup_ratio * total_steps)


def lr_multiplier(step: int, total_steps: int, warmup: int) -> float:
    """LR factor of optimizer step ``step`` (0-based): linear warmup, then linear decay.

    Warmup ramps ``1/(w+1) ... w/(w+1)``, then the factor falls linearly from 1 to
    ``1/(total-w)`` on the last step, so every step (the first and last included) trains.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(total_steps - step, 1) / max(total_steps - warmup, 1)


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL over the response tokens and how many there are.

    Args:
        logits: ``(B, T, V)`` model outputs.
        labels: ``(B, T)`` with ``-100`` on prompt and padding tokens.

    Returns:
        ``(sum of NLL, number of response tokens)``; their ratio is the answer loss.
    """
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return float(nll), int((shift_labels != IGNORE_INDEX).sum())


@dataclass
class TrainState:
    """Where training stands; saved as ``train_state.json`` in every checkpoint.

    Attributes:
        name: adapter name (an axis, or ``multitask``).
        axes: axes whose data this adapter trains on.
        config_hash: ``cfg.stage_hash("train")`` of the run that wrote it.
        template_ids: axis -> injection template id of its training data.
        total_steps: optimizer steps of the whole run.
        steps_per_epoch: optimizer steps per epoch.
        epoch: epoch of the next step.
        step_in_epoch: index within ``epoch`` of the next step.
        global_step: optimizer steps done.
        tokens: non-padding tokens trained on, all workers together.
        train_seconds: time spent in training steps, summed over attempts.
        attempts: one record per start of the loop: ``{start (unix time), from_step}``; a
            second record means the run was restarted from a checkpoint.
        finished_at: unix time the training steps ended (set before the final report).
        history: one record per step: ``{step, epoch, batches, loss, tokens, seconds}``
            (``batches`` are the global micro-batch indices the step consumed; ``loss`` and
            ``tokens`` are rank 0's).
    """

    name: str
    axes: list[str]
    config_hash: str
    template_ids: dict[str, str]
    total_steps: int
    steps_per_epoch: int
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    attempts: list[dict[str, float]] = field(default_factory=list)
    finished_at: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def advance(self) -> None:
        """Move the position past one finished optimizer step."""
        self.global_step += 1
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    @classmethod
    def load(cls, path: str | Path) -> TrainState:
        return cls(**json.loads(Path(path).read_text("utf-8")))


# ----------------------------------------------------------------------------- worker helpers


def _setup_worker_logging() -> None:
    """Workers are fresh processes: give the ``alignx`` loggers a handler once."""
    root = logging.getLogger("alignx")
    if not root.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.addHandler(h)
        root.setLevel(envs.log_level())
        root.propagate = False


def _all_reduce_sum(values: list[float], world_size: int) -> list[float]:
    """Sum a few scalars over the workers (a collective; every rank calls it)."""
    if world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _rendezvous(hooks: dict[str, Any], name: str, rank: int, timeout_s: float = 300.0) -> None:
    """Test hook: wait until ``rendezvous_count`` trainers have checked in (proves concurrency).

    Each rank-0 worker writes ``<rendezvous_dir>/<name>`` and waits for the others' files; if
    the trainers ran one after another, the first would time out.
    """
    folder = hooks.get("rendezvous_dir")
    if not folder:
        return
    if rank == 0:
        Path(folder, name).write_text(str(time.time()))
    deadline = time.time() + timeout_s
    while len(list(Path(folder).iterdir())) < int(hooks["rendezvous_count"]):
        if time.time() > deadline:
            raise TimeoutError(
                f"[{name}] the other trainers never started (rendezvous in {folder})"
            )
        time.sleep(0.2)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def collate_examples(
    examples: list[dict[str, list[int]]], indices: list[int], pad_id: int
) -> dict[str, torch.Tensor]:
    """Collate the examples at ``indices`` into ``(B, T)`` ids, labels and attention mask."""
    from alignx.data.tokenize import collate

    return collate([examples[i] for i in indices], pad_id)


@torch.no_grad()
def heldout_answer_loss(
    engine: Any,
    examples: list[dict[str, list[int]]],
    micro_batch_size: int,
    pad_id: int,
    max_batches: int | None,
    rank: int,
    world_size: int,
) -> float:
    """Mean NLL per response token on held-out examples, all workers together.

    Batches are dealt round-robin to the ranks; every rank runs the same number of forward
    passes (a rank without a batch re-runs batch 0 with weight 0), because ZeRO-3 forwards
    are collectives.

    Args:
        engine: the DeepSpeed engine (or any module taking ``input_ids``/``attention_mask``).
        examples: encoded validation examples, in split order.
        micro_batch_size: examples per forward pass.
        pad_id: the tokenizer's pad id.
        max_batches: cap on batches (``train.eval_batches``), ``None`` for all.
        rank: this worker's rank.
        world_size: number of workers.

    Returns:
        The answer loss, or ``nan`` when there is no held-out example.
    """
    from alignx.data.tokenize import collate

    batches = [
        examples[i : i + micro_batch_size] for i in range(0, len(examples), micro_batch_size)
    ]
    if max_batches is not None:
        batches = batches[:max_batches]
    if not batches:
        return float("nan")
    device = getattr(engine, "device", torch.device("cpu"))
    was_training = engine.training
    engine.eval()
    nll, count = 0.0, 0
    for i in range(math.ceil(len(batches) / world_size)):
        j = i * world_size + rank
        weight = 1 if j < len(batches) else 0
        b = _to_device(collate(batches[j if weight else 0], pad_id), device)
        out = engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        s, n = answer_nll(out.logits, b["labels"])
        nll, count = nll + weight * s, count + weight * n
    engine.train(was_training)
    nll, count = _all_reduce_sum([nll, float(count)], world_size)
    return nll / count if count else float("nan")


# ----------------------------------------------------------------------------- the loop


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train one LoRA adapter on this worker's data shard (run by ``TorchTrainer``).

    Args:
        config: ``train_loop_config`` from :func:`alignx.train.trainer.fit_adapter`:
            ``cfg`` (the ``AlignXConfig`` as JSON), ``name`` (adapter name), ``axes`` (axis
            values whose data to train on), ``budget`` (exact step count or ``None``) and
            ``hooks`` (test hooks: ``fail_once_at_step`` + ``fail_marker`` (+ ``fail_delay_s``)
            make the worker process exit once after that step; ``persistence_threshold`` overrides
            ZeRO-3's; ``rendezvous_dir`` + ``rendezvous_count`` hold every trainer until all
            have started; ``step_delay_s`` sleeps after every step, so that a test can act on
            a run in progress, e.g. kill one of its worker processes).

    Raises:
        ValueError: a checkpoint from another configuration, or too little data.
    """
    import ray.train
    import ray.train.torch
    from peft import get_peft_model

    from alignx.artifacts import ArtifactLayout
    from alignx.data.prepare import load_split
    from alignx.data.tokenize import encode_rows
    from alignx.modeling import load_base, resolve_dtype
    from alignx.storage import fetch
    from alignx.train.deepspeed import DEFAULT_PERSISTENCE_THRESHOLD, build_deepspeed_config
    from alignx.train.engine import (
        init_engine,
        load_engine_state,
        save_engine_state,
        trainable_state_dict,
    )
    from alignx.train.lora import build_lora_config

    started = time.time()
    _setup_worker_logging()

    # --- 1. config: typed again on this side of the Ray boundary ------------------------------
    cfg = AlignXConfig.model_validate(config["cfg"])
    name: str = config["name"]
    axes = [Axis(a) for a in config["axes"]]
    hooks: dict[str, Any] = config.get("hooks") or {}
    tc, optim = cfg.train, cfg.train.optim
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = tc.scaling.use_gpu

    # --- 2. threads: one worker's share of the node's cores ------------------------------------
    threads = tc.threads_per_worker or max(
        1, int(config.get("cpus_per_worker") or tc.scaling.cpus_per_worker))
    torch.set_num_threads(threads)

    # --- 3. model + LoRA: frozen base, trainable adapter with a seeded init -------------------
    model, tokenizer = load_base(cfg.model, use_gpu=use_gpu)
    torch.manual_seed(cfg.seed)
    model = get_peft_model(model, build_lora_config(tc.lora, cfg.model.name))
    model.train()
    pad_id = tokenizer.pad_token_id

    # --- 4. data: the axes' train splits (the union for multi-task), encoded once -------------
    train_rows: list[dict[str, Any]] = []
    template_ids: dict[str, str] = {}
    # with shared storage, a worker on another node brings the finished data into its run_dir
    fetch(cfg, *(ArtifactLayout(cfg.run_dir).data_dir(a) for a in axes))
    for a in axes:
        rows = load_split(cfg.run_dir, a, "train")
        train_rows.extend(rows)
        template_ids[a.value] = rows[0]["template_id"] if rows else ""
    train = encode_rows(train_rows, tokenizer, cfg.model.max_seq_len, injected=True)
    steps_per_epoch, total_steps = plan_steps(len(train), optim, world, config.get("budget"))
    warmup = warmup_steps(total_steps, optim.warmup_ratio)
    if rank == 0:
        log.info(
            "[%s] %d examples, %d workers, %d steps/epoch, %d steps (warmup %d), %d threads",
            name,
            len(train),
            world,
            steps_per_epoch,
            total_steps,
            warmup,
            threads,
        )

    # --- 5. engine: DeepSpeed (ZeRO from config) over the LoRA parameters ---------------------
    ds_config = build_deepspeed_config(
        tc,
        world,
        resolve_dtype(cfg.model.dtype, use_gpu),
        persistence_threshold=hooks.get("persistence_threshold", DEFAULT_PERSISTENCE_THRESHOLD),
    )
    device_index = ray.train.torch.get_device().index if use_gpu else None
    engine = init_engine(
        model,
        ds_config,
        [p for p in model.parameters() if p.requires_grad],
        use_gpu=use_gpu,
        device_index=device_index,
        lr_lambda=lambda s: lr_multiplier(s, total_steps, warmup),
    )

    # --- 6. resume: weights, optimizer, scheduler and the exact data position ----------------
    state = TrainState(
        name=name,
        axes=[a.value for a in axes],
        config_hash=cfg.stage_hash("train"),
        template_ids=template_ids,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
    )
    _rendezvous(hooks, name, rank)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            saved = TrainState.load(Path(ckpt_dir) / TRAIN_STATE)
            if (saved.config_hash, saved.total_steps) != (state.config_hash, total_steps):
                raise ValueError(
                    f"checkpoint {ckpt_dir} was written by another configuration "
                    f"(train hash {saved.config_hash}, {saved.total_steps} steps; now "
                    f"{state.config_hash}, {total_steps}); use a new run directory"
                )
            load_engine_state(engine, ckpt_dir)
        state = saved
        if rank == 0:
            log.info(
                "[%s] resumed at step %d (epoch %d, step %d of the epoch)",
                name,
                state.global_step,
                state.epoch,
                state.step_in_epoch,
            )

    state.attempts.append({"start": started, "from_step": state.global_step})

    def report(metrics: dict[str, Any]) -> None:
        """Save a checkpoint (every rank its share) and report it with ``metrics``."""
        lora = trainable_state_dict(engine)  # collective under ZeRO-3
        with tempfile.TemporaryDirectory(prefix=f"alignx-{name}-ckpt-") as tmp:
            save_engine_state(engine, tmp)  # collective
            if rank == 0:
                model.save_pretrained(Path(tmp) / ADAPTER_SUBDIR, state_dict=lora)
                write_json_atomic(Path(tmp) / TRAIN_STATE, asdict(state))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    # --- 7. epochs: forward / backward / step over this rank's slice of each micro-batch ------
    # Counters since the last report: [loss sum, micro-batches, tokens, seconds].
    window = [0.0, 0.0, 0.0, 0.0]
    log_every = max(1, total_steps // 20)
    lr = engine.get_lr()[0]
    order_epoch, order = -1, []
    while state.global_step < total_steps:
        if order_epoch != state.epoch:  # the epoch's permutation: a function of (seed, epoch)
            order_epoch, order = state.epoch, epoch_order(len(train), cfg.seed, state.epoch)
        step = state.global_step
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1_009 + rank)  # dropout, resumable
        first = state.step_in_epoch * optim.grad_accum
        batch_ids = list(range(first, first + optim.grad_accum))
        lr = engine.get_lr()[0]  # the LR this step applies
        t0 = time.perf_counter()
        step_loss, step_tokens = 0.0, 0
        for b in batch_ids:
            idx = micro_batch(order, b, optim.micro_batch_size, world, rank)
            batch = _to_device(collate_examples(train, idx, pad_id), engine.device)
            loss = engine(**batch).loss  # mean over this micro-batch's response tokens
            engine.backward(loss)
            engine.step()  # applies the update at the accumulation boundary
            step_loss += loss.item() / optim.grad_accum
            step_tokens += int(batch["attention_mask"].sum())
        seconds = time.perf_counter() - t0
        window = [
            window[0] + step_loss,
            window[1] + 1,
            window[2] + step_tokens,
            window[3] + seconds,
        ]
        if rank == 0:
            state.history.append(
                {
                    "step": step + 1,
                    "epoch": state.epoch,
                    "batches": batch_ids,
                    "lr": lr,
                    "loss": step_loss,
                    "tokens": step_tokens,
                    "seconds": seconds,
                }
            )
        state.advance()
        if rank == 0 and (state.global_step % log_every == 0 or state.global_step == total_steps):
            log.info(
                "[%s] step %d/%d epoch %d loss %.4f lr %.2e %.0f tok/s",
                name,
                state.global_step,
                total_steps,
                state.epoch,
                step_loss,
                lr,
                step_tokens / max(seconds, 1e-9),
            )
        if hooks.get("step_delay_s"):
            time.sleep(float(hooks["step_delay_s"]))
        if hooks.get("fail_once_at_step") == state.global_step and rank == 0:
            marker = Path(hooks["fail_marker"])
            if not marker.exists():
                marker.write_text(str(state.global_step))
                # Die a moment after the step, as a real crash would: Ray Train registers a
                # reported checkpoint when its controller next polls the worker.
                time.sleep(float(hooks.get("fail_delay_s", 0.0)))
                log.warning("[%s] test hook: worker exits after step %d", name, state.global_step)
                os._exit(1)
        if state.global_step % tc.checkpoint_every == 0 and state.global_step < total_steps:
            report(_window_metrics(state, window, lr, world))
            window = [0.0, 0.0, 0.0, 0.0]

    # --- 8. held-out answer loss on each axis's validation split, then the final report -------
    state.finished_at = time.time()
    metrics = _window_metrics(state, window, lr, world)  # lr: of the last step
    for a in axes:
        val = encode_rows(
            load_split(cfg.run_dir, a, "validation"),
            tokenizer,
            cfg.model.max_seq_len,
            injected=True,
        )
        metrics[f"eval_loss/{a.value}"] = heldout_answer_loss(
            engine, val, optim.micro_batch_size, pad_id, tc.eval_batches, rank, world
        )
    if rank == 0:
        log.info("[%s] done: %s", name, {k: v for k, v in metrics.items() if "loss" in k})
    report(metrics | {"done": True})


def _window_metrics(
    state: TrainState, window: list[float], lr: float, world_size: int
) -> dict[str, Any]:
    """Metrics of the steps since the last report, all workers together (a collective).

    Also adds the window's tokens and seconds to ``state`` (``tokens`` summed over workers,
    ``seconds`` the slowest worker's).
    """
    loss_sum, n, tokens, _ = _all_reduce_sum(window[:3] + [0.0], world_size)
    seconds = window[3]
    if world_size > 1:
        t = torch.tensor([seconds], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        seconds = float(t)
    state.tokens += int(tokens)
    state.train_seconds += seconds
    return {
        "name": state.name,
        "global_step": state.global_step,
        "epoch": state.epoch,
        "loss": loss_sum / n if n else float("nan"),
        "lr": lr,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "tokens": state.tokens,
        "train_seconds": state.train_seconds,
        "attempt": len(state.attempts),
    }
