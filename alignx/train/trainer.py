"""Stage 1 (train): run the Ray Train trainers and publish the adapters.

The only module that builds a ``TorchTrainer``. For one adapter it:

1. checks that the axes' data is prepared (``DataManifest``), before any Ray work;
2. runs ``TorchTrainer(train_loop_per_worker, ...)`` with DeepSpeed inside the workers
   (:mod:`alignx.train.loop`), ``FailureConfig(max_failures)`` for worker failures and
   ``CheckpointConfig(num_to_keep=2)``;
3. copies the final checkpoint's PEFT adapter (plus its ``train_state.json``: the position and
   the per-step history of consumed batches, as provenance) into ``<run_dir>/adapters/<name>/``
   and writes the ``AdapterManifest`` there *last* (a folder without a manifest is unfinished).

**Resuming.** Ray Train keeps each run under ``<run_dir>/ray_train/<name>-<hash>/`` (with
``storage`` set: under the run's ``ray_train/`` on shared storage, see :mod:`alignx.storage`),
where ``<hash>`` is ``cfg.stage_hash("train")``. Calling ``train_axis`` again with the same run
directory and the same config (for instance after the driver was killed) makes Ray Train
restore that run's latest checkpoint, and the loop continues at the exact data position; a
changed config gets a fresh run name. Worker failures during a run are recovered the same way,
automatically, up to ``train.max_failures`` times. Ray Train registers a reported checkpoint
when its controller next polls the workers (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by
default): a worker that dies within that window after a report resumes from the checkpoint
before it, still at that checkpoint's exact position.

**Concurrency.** :func:`train_all` runs one ``TorchTrainer.fit()`` per adapter in driver
threads; each trainer's controller and workers are Ray actors, so the trainers share the
cluster's resources (fractional ``cpus_per_worker`` fits three on a 2-core laptop; on a GPU
cluster each gets its own GPUs, or waits for them).

**Multi-task baseline.** :func:`train_multitask` trains one adapter on the union of the axes'
data for as many optimizer steps as the experts take together. With equal micro-batch, worker
count and accumulation, that is the same number of training examples; tokens differ only by
example length (each manifest records its actual ``train_tokens``).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignx.artifacts import (
    MULTITASK,
    AdapterManifest,
    ArtifactLayout,
    sha256_strings,
    write_json_atomic,
)
from alignx.axes import Axis
from alignx.envs import RAY_ENV_DEFAULTS, ray_runtime_env_vars
from alignx.modeling import base_model_id
from alignx.train.loop import ADAPTER_SUBDIR, TRAIN_STATE, TrainState, plan_steps

if TYPE_CHECKING:
    from alignx.artifacts import DataManifest
    from alignx.config import AlignXConfig, ScalingCfg, TrainCfg

log = logging.getLogger(__name__)


def ensure_ray() -> None:
    """Connect to Ray: attach to ``$RAY_ADDRESS`` if set, else start a local Ray.

    Inside a Ray job (whose driver Ray gives ``RAY_ADDRESS``) or against a cluster named by
    ``RAY_ADDRESS``, the job's / cluster's runtime environment applies: passing another one
    here would fail to merge with it. A local Ray gives workers the project's environment
    variables (:func:`alignx.envs.ray_runtime_env_vars`) and ``PYTHONPATH`` pointing at this
    checkout, so they import the same ``alignx``.
    """
    import ray

    if ray.is_initialized():
        return
    for k, v in RAY_ENV_DEFAULTS.items():  # the driver's own Ray services need them too
        os.environ.setdefault(k, v)
    if os.environ.get("RAY_ADDRESS"):
        log.info("attaching to the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        ray.init()
        return
    env = ray_runtime_env_vars()
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    # address="local": a new Ray for this driver, as documented above. A bare ray.init() would
    # attach to whatever `ray start` cluster happens to run on the machine (and die with it).
    ray.init(address="local", runtime_env={"env_vars": env})


def run_name(cfg: AlignXConfig, name: str) -> str:
    """Ray Train run name of adapter ``name``: same name + storage path = resume."""
    return f"{name}-{cfg.stage_hash('train')[:8]}"


def _absolute(cfg: AlignXConfig) -> AlignXConfig:
    # Ray Train workers run in their own working directory: ship an absolute run_dir.
    return cfg.model_copy(update={"run_dir": str(ArtifactLayout(cfg.run_dir).root)})


def _progress_callback(name: str) -> Any:
    """A ``UserCallback`` that logs rank 0's metrics of every report (runs on the controller)."""
    from ray.train import UserCallback

    class ProgressLogger(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
            from alignx.train.loop import _setup_worker_logging

            _setup_worker_logging()
            m = metrics[0] if metrics else {}
            evals = {k.split("/", 1)[1]: round(v, 4) for k, v in m.items() if k.startswith("eval_")}
            logging.getLogger(__name__).info(
                "[%s] report: step %s epoch %s loss %.4f lr %.2e %.0f tok/s%s%s",
                name,
                m.get("global_step"),
                m.get("epoch"),
                m.get("loss", float("nan")),
                m.get("lr", 0.0),
                m.get("tokens_per_s", 0.0),
                f" eval {evals}" if evals else "",
                " (checkpoint)" if checkpoint else "",
            )

    return ProgressLogger()


def _publish_dir(src: Path, extra: list[Path], dst: Path) -> None:
    """Replace ``dst`` by a copy of ``src`` plus ``extra`` files (staged beside it, renamed)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-new-", dir=dst.parent))
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    for f in extra:
        shutil.copy2(f, tmp / f.name)
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}-old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _train_loss(state: TrainState, last: int) -> float | None:
    losses = [h["loss"] for h in state.history[-last:]]
    return sum(losses) / len(losses) if losses else None


def fit_adapter(
    cfg: AlignXConfig,
    name: str,
    axes: list[Axis],
    *,
    budget: int | None = None,
    hooks: dict[str, Any] | None = None,
    cpus_per_worker: float | None = None,
) -> AdapterManifest:
    """Train one LoRA adapter with Ray Train + DeepSpeed and publish it.

    Args:
        cfg: the run config (``run_dir`` holds the prepared data).
        name: adapter name: an axis value, or ``multitask``.
        axes: axes whose training data the adapter learns from (one, or all for multi-task).
        budget: exact optimizer step count (multi-task); ``None`` follows ``train.optim``.
        hooks: test hooks passed to the loop (see :func:`alignx.train.loop.train_loop_per_worker`).
        cpus_per_worker: CPUs (and torch threads) per worker instead of
            ``train.scaling.cpus_per_worker`` (:func:`wave_cpus_per_worker`); not part of the
            config, so the adapter's train hash does not change.

    Returns:
        The manifest written to ``<run_dir>/adapters/<name>/manifest.json``.

    Raises:
        ArtifactNotFoundError: an axis has no prepared data (names ``alignx prepare``).
        ray.train.TrainingFailedError: the workers failed more than ``train.max_failures`` times.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from alignx.storage import fetch, publish, ray_train_location
    from alignx.train.loop import train_loop_per_worker
    from alignx.train.lora import resolve_target_modules

    cfg = _absolute(cfg)
    layout = ArtifactLayout(cfg.run_dir)
    fetch(cfg, *(layout.data_dir(a) for a in axes))  # with shared storage: its finished copy
    data: dict[Axis, DataManifest] = {a: layout.load_data_manifest(a) for a in axes}
    storage_path, storage_fs = ray_train_location(cfg)
    sc = cfg.train.scaling
    cpus = cpus_per_worker or sc.cpus_per_worker
    resources = {"CPU": cpus} | ({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})
    ensure_ray()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "name": name,
            "axes": [a.value for a in axes],
            "budget": budget,
            "cpus_per_worker": cpus,
            "hooks": dict(hooks or {}),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name(cfg, name),
            storage_path=storage_path,
            storage_filesystem=storage_fs,  # None: local run_dir; else the shared storage's
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[_progress_callback(name)],
        ),
    )
    log.info("[%s] training on %s -> %s", name, [a.value for a in axes], storage_path)
    t0 = time.time()
    result = trainer.fit()
    seconds = time.time() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"[{name}] Ray Train finished without a checkpoint ({result.path})")

    # Publish: adapter files (+ train_state.json) first, the manifest last.
    with result.checkpoint.as_directory() as ckpt_dir:
        state = TrainState.load(Path(ckpt_dir) / TRAIN_STATE)
        # The train state (position, per-step history) travels with the adapter as provenance.
        _publish_dir(
            Path(ckpt_dir) / ADAPTER_SUBDIR,
            [Path(ckpt_dir) / TRAIN_STATE],
            layout.adapter_dir(name),
        )
    metrics = result.metrics or {}
    eval_loss: dict[str, float] = {}
    for a in axes:
        v = metrics.get(f"eval_loss/{a.value}")
        if v is not None and math.isfinite(v):  # NaN: the axis has no validation example
            eval_loss[a.value] = float(v)
    lora = cfg.train.lora
    manifest = AdapterManifest(
        name=name,
        axes=list(axes),
        base_model=base_model_id(cfg.model),
        template_ids={a.value: m.template_id for a, m in data.items()},
        data_hash=(
            data[axes[0]].data_hash
            if len(axes) == 1
            else sha256_strings(f"{a.value}:{m.data_hash}" for a, m in data.items())
        ),
        lora={
            "rank": lora.rank,
            "alpha": lora.alpha,
            "dropout": lora.dropout,
            "target_modules": resolve_target_modules(lora, cfg.model.name),
        },
        zero_stage=cfg.train.deepspeed.zero_stage,
        num_workers=sc.num_workers,
        steps=state.global_step,
        train_tokens=state.tokens,
        train_loss=_train_loss(state, cfg.train.checkpoint_every),
        eval_loss=eval_loss,
        tokens_per_s=state.tokens / state.train_seconds if state.train_seconds > 0 else None,
        train_seconds=round(seconds, 2),
        config_hash=cfg.stage_hash("train"),
        ray_run=str(result.path),
    )
    layout.save_config(cfg, f"adapters/{name}/config.yaml")  # the resolved config it came from
    write_json_atomic(layout.adapter_manifest(name), manifest)  # last: the adapter is complete
    publish(cfg, layout.adapter_dir(name))  # with shared storage: upload, manifest last
    log.info(
        "[%s] adapter -> %s (%d steps, train loss %s, eval %s, %.0f s)",
        name,
        layout.adapter_dir(name),
        manifest.steps,
        manifest.train_loss,
        eval_loss,
        seconds,
    )
    return manifest


def train_axis(
    cfg: AlignXConfig, axis: Axis, *, hooks: dict[str, Any] | None = None,
    cpus_per_worker: float | None = None,
) -> AdapterManifest:
    """Train the LoRA expert of one axis (see :func:`fit_adapter`).

    Args:
        cfg: the run config.
        axis: the axis.
        hooks: test hooks for the loop.

    Returns:
        The adapter's manifest.
    """
    return fit_adapter(cfg, axis.value, [axis], hooks=hooks, cpus_per_worker=cpus_per_worker)


def multitask_step_budget(cfg: AlignXConfig) -> int:
    """Optimizer steps of the multi-task baseline: the experts' step counts added up.

    Computed from the prepared train split sizes (the ``DataManifest`` counts) with the same
    rule the loop applies (:func:`alignx.train.loop.plan_steps`).

    Raises:
        ArtifactNotFoundError: an axis has no prepared data.
        ValueError: an axis has too little data for one step.
    """
    layout = ArtifactLayout(cfg.run_dir)
    world = cfg.train.scaling.num_workers
    total = 0
    for a in cfg.axes:
        n = layout.load_data_manifest(a).splits["train"].count
        total += plan_steps(n, cfg.train.optim, world)[1]
    return total


def train_multitask(cfg: AlignXConfig, *, hooks: dict[str, Any] | None = None,
                    cpus_per_worker: float | None = None) -> AdapterManifest:
    """Train the single-adapter multi-task baseline on the union of ``cfg.axes``' data.

    It trains for :func:`multitask_step_budget` steps, as many as the experts together, so it
    sees the same number of training examples (and, up to example lengths, tokens) as the
    three experts combined. Held-out loss is reported per axis.

    Args:
        cfg: the run config.
        hooks: test hooks for the loop.

    Returns:
        The manifest of ``<run_dir>/adapters/multitask/``.
    """
    return fit_adapter(
        cfg, MULTITASK, list(cfg.axes), budget=multitask_step_budget(cfg), hooks=hooks,
        cpus_per_worker=cpus_per_worker,
    )


def train_all(
    cfg: AlignXConfig,
    axes: list[Axis] | None = None,
    multitask: bool = False,
    *,
    hooks: dict[str, Any] | None = None,
) -> dict[str, AdapterManifest]:
    """Train the axes' experts (and optionally the multi-task baseline) concurrently.

    One driver thread per adapter calls ``TorchTrainer.fit()``; Ray schedules all trainers'
    workers at once on the cluster's resources.

    Args:
        cfg: the run config.
        axes: the experts to train; default ``cfg.axes``.
        multitask: also train the multi-task baseline (its step budget always covers all of
            ``cfg.axes``).
        hooks: test hooks for every loop.

    Returns:
        ``{adapter name: manifest}``, experts in axis order, then ``multitask``.

    Raises:
        RuntimeError: one or more trainings failed (after all have finished; names them).
    """
    axes = list(cfg.axes if axes is None else axes)
    cfg = _absolute(cfg)
    ensure_ray()
    jobs: dict[str, Any] = {a.value: (train_axis, (cfg, a)) for a in axes}
    if multitask:
        jobs[MULTITASK] = (train_multitask, (cfg,))
    if not jobs:
        return {}
    capacity = _cluster_capacity()
    waves = plan_waves(list(jobs), cfg.train.scaling, capacity)
    if len(waves) > 1:
        log.info("the cluster cannot hold all %d trainers at once; running %s", len(jobs),
                 " then ".join("+".join(w) for w in waves))
    out: dict[str, AdapterManifest] = {}
    failed: dict[str, BaseException] = {}
    for i, wave in enumerate(waves):  # after a wave, wait briefly for its CPUs to come back
        free = _free_cpus(capacity["CPU"], settle_s=5.0 if i else 0.0)
        cpus = wave_cpus_per_worker(cfg.train, len(wave), *free)
        if cpus != cfg.train.scaling.cpus_per_worker:
            log.info("%s: %g CPUs (torch threads) per worker instead of %g: the cluster's "
                     "other CPUs would idle", "+".join(wave), cpus,
                     cfg.train.scaling.cpus_per_worker)
        with ThreadPoolExecutor(max_workers=len(wave), thread_name_prefix="alignx-train") as pool:
            futures = {n: pool.submit(jobs[n][0], *jobs[n][1], hooks=hooks, cpus_per_worker=cpus)
                       for n in wave}
            for n, fut in futures.items():
                try:
                    out[n] = fut.result()
                except Exception as e:  # collect: the other trainers keep running
                    log.error("[%s] training failed: %s", n, e)
                    failed[n] = e
    if failed:
        first = next(iter(failed.values()))
        raise RuntimeError(f"training failed for {sorted(failed)}: {first}") from first
    return out


def _cluster_capacity() -> dict[str, float]:
    import ray

    res = ray.cluster_resources()
    return {"CPU": float(res.get("CPU", 0.0)), "GPU": float(res.get("GPU", 0.0))}


def wave_cpus_per_worker(tc: TrainCfg, n_trainers: int, free_cpus: float,
                         node_cpus: float) -> float:
    """CPUs per worker for a wave of ``n_trainers`` concurrent trainers (pure; unit-tested).

    ``train.scaling.cpus_per_worker`` is sized for the widest wave (three experts on a laptop).
    A narrower wave (the multi-task baseline alone after them) would leave CPUs idle, since a
    worker runs as many torch threads as it has whole CPUs; it gets an equal share of the
    cluster's free CPUs instead, in whole CPUs and at most one node's. Not on GPU workers, and
    not when ``train.threads_per_worker`` pins the threads.

    Args:
        tc: the training config.
        n_trainers: trainers in the wave.
        free_cpus: CPUs free in the cluster now.
        node_cpus: CPUs of the largest node (one worker cannot span nodes).
    """
    sc = tc.scaling
    if sc.use_gpu or tc.threads_per_worker is not None:
        return sc.cpus_per_worker
    share = min(int(free_cpus // (n_trainers * sc.num_workers) + 1e-9), int(node_cpus + 1e-9))
    return float(share) if share > sc.cpus_per_worker else sc.cpus_per_worker


def _free_cpus(total: float, settle_s: float) -> tuple[float, float]:
    """(CPUs free in the cluster, CPUs of its largest alive node).

    The previous wave's workers release their CPUs shortly after ``fit()`` returns, so this
    waits up to ``settle_s`` for the free count to reach the cluster's ``total``.
    """
    import ray

    deadline = time.monotonic() + settle_s
    while (free := float(ray.available_resources().get("CPU", 0.0))) < total and (
            time.monotonic() < deadline):
        time.sleep(0.5)
    node = max((float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes()
                if n.get("Alive")), default=0.0)
    return free, node


def plan_waves(
    names: list[str], scaling: ScalingCfg, capacity: dict[str, float]
) -> list[list[str]]:
    """Group trainers into waves that fit the cluster at once (pure; unit-tested).

    Every trainer asks for the same resources (``num_workers`` x per-worker CPUs/GPUs). If all fit,
    there is one wave. Otherwise the experts go first, as many per wave as fit, and the
    multi-task baseline after them: a trainer whose workers cannot be placed would otherwise
    hit Ray Train's worker-group start-up timeout instead of queueing.
    """
    need_cpu = scaling.num_workers * scaling.cpus_per_worker
    need_gpu = scaling.num_workers * scaling.gpus_per_worker if scaling.use_gpu else 0.0
    fits = []
    for res, need in (("CPU", need_cpu), ("GPU", need_gpu)):
        if need > 0:
            fits.append(int(capacity.get(res, 0.0) // need + 1e-9))
    per_wave = max(1, min(fits) if fits else len(names))
    if per_wave >= len(names):
        return [list(names)]
    ordered = [n for n in names if n != MULTITASK] + [n for n in names if n == MULTITASK]
    return [ordered[i : i + per_wave] for i in range(0, len(ordered), per_wave)]
