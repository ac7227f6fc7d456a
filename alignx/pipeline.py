"""Chaining the stages, resumably: a finished stage (its manifest exists and was made from
the same config sections) is not redone.

``alignx pipeline`` and ``jobs/run_pipeline.py`` call :func:`run_pipeline`; ``alignx train``
calls :func:`run_prepare` + :func:`run_train` directly.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from alignx.artifacts import MULTITASK, AdapterManifest, ArtifactLayout, read_json
from alignx.axes import Axis

if TYPE_CHECKING:
    from alignx.config import AlignXConfig

log = logging.getLogger(__name__)


def run_prepare(cfg: AlignXConfig) -> None:
    """Stage 1a: prepared Parquet splits for every configured axis."""
    from alignx.data.prepare import prepare_all

    prepare_all(cfg)


def _finished_adapter(cfg: AlignXConfig, name: str) -> AdapterManifest | None:
    layout = ArtifactLayout(cfg.run_dir)
    if not _done(cfg, layout.adapter_manifest(name), "train"):
        return None
    return layout.load_adapter_manifest(name)


def run_train(
    cfg: AlignXConfig, axes: list[Axis], multitask: bool = False, force: bool = False
) -> dict[str, AdapterManifest]:
    """Stage 1b: train the axes' experts concurrently (+ the multi-task baseline).

    Adapters already trained from the same config sections are reused unless ``force``.
    """
    from alignx.storage import remove
    from alignx.train.trainer import run_name, train_all

    if force:  # the same Ray run name would *resume* the finished run: start those afresh
        layout = ArtifactLayout(cfg.run_dir)
        for name in [a.value for a in axes] + ([MULTITASK] if multitask else []):
            shutil.rmtree(layout.ray_train_dir / run_name(cfg, name), ignore_errors=True)
            remove(cfg, f"ray_train/{run_name(cfg, name)}")  # its copy on shared storage
    out: dict[str, AdapterManifest] = {}
    todo: list[Axis] = []
    for a in axes:
        m = None if force else _finished_adapter(cfg, a.value)
        if m is not None:
            log.info("adapter %s is up to date; skipping (use --force to retrain)", a.value)
            out[a.value] = m
        else:
            todo.append(a)
    mt = None if (force or not multitask) else _finished_adapter(cfg, MULTITASK)
    if mt is not None:
        log.info("multi-task adapter is up to date; skipping")
        out[MULTITASK] = mt
    if todo or (multitask and mt is None):
        out.update(train_all(cfg, axes=todo, multitask=multitask and mt is None))
    return out


def _finished(path, stage_hash: str) -> bool:
    """A stage whose JSON output exists and records the same stage hash is finished."""
    from alignx.artifacts import read_json

    try:
        return path.is_file() and read_json(path).get("config_hash") == stage_hash
    except ValueError:  # unreadable: redo
        return False


def _done(cfg: AlignXConfig, path: Path, stage: str) -> bool:
    """:func:`_finished` in ``run_dir``, or else on shared storage (then fetched into it).

    ``path`` is a stage's JSON output: a folder's ``manifest.json`` or a one-file artifact.
    A finished local copy is published (a no-op when shared storage already has it), so a run
    interrupted before publishing loses nothing. Without ``storage`` this is :func:`_finished`.
    """
    from alignx.storage import MANIFEST, fetch, publish

    artifact = path.parent if path.name == MANIFEST else path
    if _finished(path, cfg.stage_hash(stage)):
        publish(cfg, artifact)
        return True
    return any(fetch(cfg, artifact).values()) and _finished(path, cfg.stage_hash(stage))


def run_pipeline(cfg: AlignXConfig, force: bool = False, evaluate: bool = True) -> None:
    """prepare -> train all axes (+ multi-task unless ``train.multitask`` is false) -> stage-1
    report -> calibrate the router -> H3Fusion baseline gates -> deploy on Serve + evaluate
    every system -> report.

    Every stage is skipped when its output exists and was made from the same config sections.

    Args:
        cfg: the run config.
        force: redo every stage.
        evaluate: run the last two stages (baseline gates, deploy + evaluate).
    """
    from alignx.interference import stage1_report
    from alignx.router.calibrate import calibrate_router, format_report
    from alignx.storage import publish

    t0 = time.time()
    layout = ArtifactLayout(cfg.run_dir)
    layout.save_config(cfg)
    publish(cfg, layout.config_path)
    log.info("[1/6] prepare data -> %s", layout.root / "data")
    run_prepare(cfg)
    log.info("[2/6] train %d experts concurrently%s", len(cfg.axes),
             " + multi-task baseline" if cfg.train.multitask else " (train.multitask=false)")
    run_train(cfg, list(cfg.axes), multitask=cfg.train.multitask, force=force)
    if not force and _done(cfg, layout.stage1_report, "train"):
        log.info("[3/6] stage-1 report is up to date; skipping")
    else:
        log.info("[3/6] stage-1 report")
        print(stage1_report(cfg)["table"], flush=True)
    router_manifest = layout.root / "router" / "manifest.json"
    if not force and _done(cfg, router_manifest, "calibrate"):
        log.info("[4/6] router is up to date; skipping")
    else:
        from alignx.artifacts import read_json
        from alignx.train.trainer import ensure_ray

        log.info("[4/6] calibrate the MoCaE router")
        ensure_ray()
        calibrate_router(cfg)
        print(format_report(read_json(layout.root / "router" / "router_report.json")), flush=True)
    if evaluate:
        run_baselines(cfg, force)
        run_evaluate(cfg, force)
    print(f"pipeline finished in {time.time() - t0:.0f}s; artifacts in {layout.root}", flush=True)


def run_baselines(cfg: AlignXConfig, force: bool = False) -> None:
    """[5/6] Train the H3Fusion-style token-MoE gates when ``h3fusion`` is evaluated."""
    if "h3fusion" not in cfg.eval.systems:
        log.info("[5/6] h3fusion is not in eval.systems; no baseline gates to train")
        return
    from alignx.baselines.h3fusion import finished_h3fusion, train_h3fusion
    from alignx.train.trainer import ensure_ray

    if not force and finished_h3fusion(cfg) is not None:
        log.info("[5/6] H3Fusion gates are up to date; skipping")
        return
    log.info("[5/6] train the H3Fusion token-MoE gates (baseline)")
    ensure_ray()
    train_h3fusion(cfg, force=force)


def run_evaluate(cfg: AlignXConfig, force: bool = False) -> None:
    """[6/6] Deploy the app with every evaluated system on Serve, evaluate, write the report."""
    from alignx.eval.run import eval_manifest_path, evaluate, report_path

    if not force and _done(cfg, eval_manifest_path(cfg), "evaluate"):
        from alignx.eval.report import markdown_table

        log.info("[6/6] evaluation report is up to date; skipping")
        print(markdown_table(read_json(report_path(cfg))), flush=True)
        return
    log.info("[6/6] deploy on Serve and evaluate %s", ", ".join(cfg.eval.systems))
    evaluate(cfg)
