"""The ``alignx`` command: one subcommand per pipeline stage.

Every stage subcommand takes ``--config FILE``, ``--run-dir DIR`` and dotted ``key=value``
overrides, prints the resolved config, saves it into the run directory, runs one library
function and prints where its artifacts went. User mistakes (bad config, missing data,
mismatched artifacts, a missing optional package) end with one ``error:`` line and exit
status 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alignx.config import AlignXConfig

log = logging.getLogger("alignx")

EPILOG = """\
examples:
  alignx models
  alignx config --config jobs/configs/tiny.yaml train.lora.rank=8
  ALIGNX_DATA_DIR=../shared/data alignx train --config jobs/configs/smollm2_cpu.yaml --run-dir runs/s --all
  alignx pipeline --config jobs/configs/smollm2_cpu.yaml --run-dir runs/s
  alignx submit pipeline --address http://HEAD:8265 -c jobs/configs/mistral7b.yaml -r /mnt/shared/runs/m7b
"""


def _setup_logging() -> None:
    from alignx import envs

    envs.setup_logging()


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE",
                   help="YAML config (see jobs/configs/); default: <run-dir>/config.yaml if it exists")
    p.add_argument("--run-dir", "-r", metavar="DIR", help="run directory for artifacts (overrides run_dir)")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="dotted overrides, e.g. train.lora.rank=16 data.max_train_per_axis=200",
    )


def resolve(args: argparse.Namespace, save: bool = True) -> AlignXConfig:
    """Load + validate the config, print it, and save it into the run directory."""
    from alignx.artifacts import ArtifactLayout
    from alignx.config import load_config

    path = args.config
    if path is None and args.run_dir:  # continue a run with the config it was made with
        saved = ArtifactLayout(args.run_dir).config_path
        path = str(saved) if saved.is_file() else None
    cfg = load_config(path, args.overrides, run_dir=args.run_dir)
    print(f"# resolved config (hash {cfg.config_hash()})\n{cfg.to_yaml()}", flush=True)
    if save:
        ArtifactLayout(cfg.run_dir).save_config(cfg)
    return cfg


# ----------------------------------------------------------------------------- commands


def cmd_models(args: argparse.Namespace) -> int:
    from alignx.models import registry_table

    print(registry_table())
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    resolve(args, save=False)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from alignx.data.prepare import prepare_all

    cfg = resolve(args)
    for axis, m in prepare_all(cfg).items():
        counts = ", ".join(f"{k}={v.count}" for k, v in m.splits.items())
        print(f"prepared {axis.value:<13} source={m.source:<11} {counts}  hash={m.data_hash[:12]}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from alignx.axes import parse_axis
    from alignx.pipeline import run_prepare, run_train

    if not (args.all or args.axis or args.multitask):
        raise SystemExit("error: say what to train: --axis AXIS (repeatable), --all, and/or --multitask")
    cfg = resolve(args)
    axes = list(cfg.axes) if args.all else [parse_axis(a) for a in args.axis or []]
    run_prepare(cfg)
    done = run_train(cfg, axes=axes, multitask=args.multitask, force=args.force)
    for name, m in done.items():
        losses = ", ".join(f"{k}={v:.3f}" for k, v in m.eval_loss.items())
        print(f"adapter {name:<13} steps={m.steps} eval_loss[{losses}] -> {cfg.run_dir}/adapters/{name}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from alignx.interference import stage1_report

    cfg = resolve(args)
    report = stage1_report(cfg, max_examples=args.max_examples)
    print(report["table"])
    print(f"wrote {Path(cfg.run_dir) / 'stage1_report.json'}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from alignx.artifacts import read_json
    from alignx.router.calibrate import calibrate_router, format_report
    from alignx.train.trainer import ensure_ray

    cfg = resolve(args)
    ensure_ray()
    manifest = calibrate_router(cfg)
    router_dir = Path(cfg.run_dir) / "router"
    print(format_report(read_json(router_dir / "router_report.json")))
    print(f"router ({manifest['encoder']}, lambdas {manifest['lambdas']}) -> {router_dir}")
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    import json

    from alignx.router.serving import route_prompts

    cfg = resolve(args, save=False)
    src = sys.stdin if args.input in (None, "-") else open(args.input, encoding="utf-8")
    with src:
        lines = src.readlines()
    from alignx.storage import run_location

    for row in route_prompts(run_location(cfg) or cfg.run_dir, lines, cfg.model, cfg.router):
        print(json.dumps(row), flush=True)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from alignx.serve import deploy
    from alignx.serve.app import build_app
    from alignx.train.trainer import ensure_ray

    cfg = resolve(args)
    app_args = deploy.app_args(cfg, routing=not args.no_router, engine=args.engine)
    ensure_ray()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(app_args), name="alignx", route_prefix="/")
    print(f"serving {cfg.run_dir} on http://{args.host}:{args.port}/v1/chat/completions "
          "(models: alignx, expert-<axis>); Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import os

    cfg = resolve(args)
    if args.models:
        from alignx.eval.run import evaluate_models

        models = [m.strip() for m in args.models.split(",") if m.strip()]
        evaluate_models(cfg, models, force=args.force)
        return 0
    from alignx.eval.run import evaluate

    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise ValueError(f"--api-key-env {args.api_key_env}: that variable is not set")
    evaluate(cfg, url=args.url, api_key=key)
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from alignx.pipeline import run_pipeline

    cfg = resolve(args)
    run_pipeline(cfg, force=args.force, evaluate=not args.no_evaluate)
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from alignx import __version__

    parser = argparse.ArgumentParser(
        prog="alignx",
        description="AlignX: align an LLM on helpfulness, harmlessness and honesty "
        "(LoRA experts on Ray Train + DeepSpeed, MoCaE router, Ray Serve).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"alignx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str, common: bool = True):
        p = sub.add_parser(name, help=help, description=help)
        if common:
            _add_common(p)
        p.set_defaults(fn=fn)
        return p

    add("models", cmd_models, "list the model registry (default, paper models, tiny stand-ins)", False)
    add("config", cmd_config, "print the resolved, validated config (nothing is run)")
    add("prepare", cmd_prepare, "Stage 1a: read the raw data, inject templates, write Parquet splits")
    p = add("train", cmd_train, "Stage 1b: LoRA expert(s) with Ray Train + DeepSpeed")
    p.add_argument("--axis", "-a", action="append", help="axis to train (repeatable)")
    p.add_argument("--all", action="store_true", help="train every configured axis concurrently")
    p.add_argument("--multitask", action="store_true",
                   help="also train the single-adapter multi-task baseline (same total tokens)")
    p.add_argument("--force", action="store_true", help="retrain even if a matching adapter exists")
    p = add("report", cmd_report,
            "Stage 1 report: held-out losses (base/experts/multi-task) + task-vector cosines")
    p.add_argument("--max-examples", type=int, metavar="N",
                   help="validation examples per axis (default: all prepared)")
    add("calibrate", cmd_calibrate,
        "Stage 2: embed calibration prompts (Ray Data), fit + report the MoCaE router")
    p = add("route", cmd_route, "route prompts with a calibrated router: one JSON line per prompt")
    p.add_argument("--input", "-i", metavar="FILE",
                   help="JSON Lines with a 'prompt' field, or plain lines; default stdin")
    p = add("serve", cmd_serve, "serve a run's experts + router on Ray Serve (OpenAI-compatible HTTP)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-router", action="store_true", help="serve only the expert-<axis> models")
    p.add_argument("--engine", choices=("auto", "numpy", "torch"), default="auto",
                   help="experts' generation engine: numpy is torch-free on CPU (a third of a "
                        "torch replica's memory); auto picks it when the model allows "
                        "(default: auto)")
    p = add("evaluate", cmd_evaluate,
            "evaluate AlignX and the baselines (deploys the run's app on Serve unless --url), "
            "or run and compare several base models in parallel (--models)")
    p.add_argument("--url", metavar="URL",
                   help="an already running AlignX app, e.g. http://127.0.0.1:8000 (default: "
                        "deploy the run's app for the evaluation)")
    p.add_argument("--api-key-env", metavar="VAR", help="env var with the app's bearer key")
    p.add_argument("--models", metavar="A,B,...",
                   help="comma-separated base models (registry names, e.g. mistral7b,gemma7b,"
                        "deepseek7b,llama2_7b): one whole pipeline per model, concurrently")
    p.add_argument("--force", action="store_true", help="with --models: redo finished stages")
    p = add("pipeline", cmd_pipeline,
            "run every stage in order (prepare -> train all + multi-task -> stage-1 report -> calibrate "
            "-> baseline gates -> deploy + evaluate -> report), resumable")
    p.add_argument("--force", action="store_true", help="redo stages even if finished")
    p.add_argument("--no-evaluate", action="store_true",
                   help="stop after calibrating the router (no baseline gates, no Serve evaluation)")
    from alignx.submit import add_cluster_commands

    add_cluster_commands(sub, _add_common)  # `alignx submit` / `alignx jobs` (cluster/README.md)
    return parser


def main(argv: list[str] | None = None) -> int:
    from alignx.artifacts import ArtifactMismatchError, ArtifactNotFoundError
    from alignx.config import AlignXConfigError
    from alignx.storage import StorageError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    _setup_logging()
    user_errors: tuple[type[BaseException], ...] = (
        AlignXConfigError, ArtifactMismatchError, ArtifactNotFoundError, ImportError,
        FileNotFoundError, StorageError,
    )
    try:
        from alignx.data.sources import DataFormatError

        user_errors += (DataFormatError,)
    except ImportError:
        pass
    try:
        return int(args.fn(args) or 0)
    except user_errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # our libraries raise ValueError for bad input, with the fix named
        log.debug("traceback", exc_info=True)
        print(f"error: {e}\n(ALIGNX_LOG_LEVEL=DEBUG shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
