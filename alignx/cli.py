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
"""


def _setup_logging() -> None:
    from alignx import envs

    logging.basicConfig(
        level=envs.log_level(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config (see jobs/configs/)")
    p.add_argument("--run-dir", "-r", metavar="DIR", help="run directory for artifacts (overrides run_dir)")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="dotted overrides, e.g. train.lora.rank=16 data.max_train_per_axis=200",
    )


def resolve(args: argparse.Namespace, save: bool = True) -> AlignXConfig:
    """Load + validate the config, print it, and save it into the run directory."""
    from alignx.artifacts import ArtifactLayout
    from alignx.config import load_config

    cfg = load_config(args.config, args.overrides, run_dir=args.run_dir)
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
    report = stage1_report(cfg)
    print(report["table"])
    print(f"wrote {Path(cfg.run_dir) / 'stage1_report.json'}")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from alignx.pipeline import run_pipeline

    cfg = resolve(args)
    run_pipeline(cfg, force=args.force)
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
    add("report", cmd_report, "Stage 1 report: held-out losses (base/experts/multi-task) + task-vector cosines")
    p = add("pipeline", cmd_pipeline,
            "run every stage in order (prepare -> train all + multi-task -> stage-1 report), resumable")
    p.add_argument("--force", action="store_true", help="redo stages even if finished")
    return parser


def main(argv: list[str] | None = None) -> int:
    from alignx.artifacts import ArtifactMismatchError, ArtifactNotFoundError
    from alignx.config import AlignXConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    _setup_logging()
    user_errors: tuple[type[BaseException], ...] = (
        AlignXConfigError, ArtifactMismatchError, ArtifactNotFoundError, ImportError,
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
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
