"""Cluster operations: submit a pipeline stage as a Ray Job, list, follow and stop jobs.

``alignx submit <stage> --address http://HEAD:8265 ...`` uploads this checkout as the job's
``working_dir`` (minus ``runs/``, ``.venv``, ``.git`` and caches), merges the runtime
environment of ``cluster/runtime_env.yaml`` with ``--runtime-env FILE`` and ``--env K=V``, runs
the stage's launcher in ``jobs/`` on the cluster, streams its logs and exits with its final
status: 0 when the job SUCCEEDED, 1 when it FAILED or was STOPPED, 2 when it could not be
submitted (bad flags, unreachable cluster, refused token) -- always with one ``error:`` line.

Token auth (``RAY_AUTH_MODE=token``, see cluster/README.md) needs nothing from this module:
with ``RAY_AUTH_MODE=token`` in the client's environment, Ray's ``JobSubmissionClient`` sends
``Authorization: Bearer <token>``, the token coming from ``RAY_AUTH_TOKEN``, else the file
named by ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``. A 401/403 from the cluster is
reported here as one line naming those variables.

Secrets never travel in a runtime environment (Ray stores it in the job table and the dashboard
shows it): env vars whose name looks like a credential are refused; set them on the nodes
(a Kubernetes Secret, or the launcher's environment) instead.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignx.envs import log_level, looks_secret

#: Stage -> its Ray job launcher, relative to the project root (each wraps one `alignx` command).
STAGES: dict[str, str] = {
    "prepare": "jobs/prepare_data.py",
    "train": "jobs/train_axis.py",
    "calibrate": "jobs/calibrate_router.py",
    "evaluate": "jobs/evaluate.py",
    "pipeline": "jobs/run_pipeline.py",
}
#: Options of a stage command that belong to every command, not to the stage.
_COMMON_DESTS = {"help", "config", "run_dir", "overrides"}
#: The shipped runtime environment every submission starts from.
RUNTIME_ENV_FILE = "cluster/runtime_env.yaml"
#: Always left out of the uploaded working directory, whatever the runtime env files say.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    "runs/", ".venv/", ".git/", "**/__pycache__/", ".pytest_cache/", ".ruff_cache/", ".cache/",
    "*.egg-info/",
)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class ClusterError(Exception):
    """A submission problem the user can fix; the message is one line naming the fix."""


@dataclass
class Submission:
    """Everything ``alignx submit`` sends: the stage's entrypoint and its runtime env."""

    stage: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- building


def project_root() -> Path:
    """The checkout to upload: the one this ``alignx`` was imported from, else the cwd.

    Raises:
        ClusterError: neither holds ``jobs/`` and ``alignx/`` (a non-editable install run
            outside the checkout).
    """
    for cand in (Path(__file__).resolve().parents[1], Path.cwd().resolve()):
        if (cand / "jobs").is_dir() and (cand / "alignx").is_dir():
            return cand
    raise ClusterError("cannot find the AlignX checkout to upload (a folder with jobs/ and "
                       "alignx/): run `alignx submit` from the project root")


def _read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ClusterError(f"{what} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ClusterError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ClusterError(f"{what} {path} must be a mapping (working_dir:, env_vars:, ...)")
    return data


def merge_runtime_env(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: ``env_vars`` merge key by key, ``excludes`` are the union,
    any other key of ``over`` replaces the base's."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k == "env_vars" and isinstance(v, dict):
            out["env_vars"] = {**out.get("env_vars", {}), **v}
        elif k == "excludes" and isinstance(v, list):
            seen = list(out.get("excludes", []))
            out["excludes"] = seen + [x for x in v if x not in seen]
        else:
            out[k] = copy.deepcopy(v)
    return out


def build_runtime_env(root: Path, user_file: str | None, env: list[str]) -> dict[str, Any]:
    """The job's runtime env: cluster/runtime_env.yaml, then ``user_file``, then ``--env``.

    A relative ``working_dir`` is resolved against the project root (not the cwd) and the
    default excludes are always added.

    Raises:
        ClusterError: an unreadable file, a malformed ``--env``, a secret-looking env var.
    """
    shipped = root / RUNTIME_ENV_FILE
    renv = _read_yaml_mapping(shipped, "runtime env") if shipped.is_file() else {}
    if user_file:
        renv = merge_runtime_env(renv, _read_yaml_mapping(Path(user_file), "--runtime-env"))
    for item in env:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ClusterError(f"--env {item!r} must look like NAME=VALUE")
        renv = merge_runtime_env(renv, {"env_vars": {k: v}})
    renv = merge_runtime_env(renv, {"excludes": list(DEFAULT_EXCLUDES)})
    env_vars = renv.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        raise ClusterError("runtime env: env_vars must be a mapping NAME: value")
    renv["env_vars"] = {str(k): str(v) for k, v in env_vars.items()}
    for name in renv["env_vars"]:
        if looks_secret(name):
            raise ClusterError(
                f"runtime env var {name} looks like a secret: Ray stores runtime envs in the job "
                "table and the dashboard shows them; set it in the nodes' environment instead "
                "(a Kubernetes Secret, or the cluster launcher's env; see cluster/README.md)")
    wd = renv.get("working_dir", ".")
    if isinstance(wd, str) and "://" not in wd:
        wd_path = Path(wd).expanduser()
        renv["working_dir"] = str(wd_path if wd_path.is_absolute() else (root / wd_path).resolve())
    return renv


def _relative_config(config: str, root: Path) -> str:
    p = Path(config).expanduser().resolve()
    if not p.is_file():
        raise ClusterError(f"--config {config}: no such file")
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        raise ClusterError(
            f"--config {config} is outside the project ({root}); the job only sees the uploaded "
            "checkout: copy the file under jobs/configs/") from None


def _check_run_dir(run_dir: str | None, shared: str | None = None) -> str:
    """``--run-dir`` must name a place that outlives the job: absolute (on storage every node
    sees) or a URI; with ``storage`` configured it is only each node's scratch copy."""
    if not run_dir:
        raise ClusterError("give --run-dir: an absolute path every node of the cluster sees, "
                           "e.g. --run-dir /mnt/shared/runs/mistral7b")
    if shared is None and "://" not in run_dir and not Path(run_dir).is_absolute():
        raise ClusterError(f"--run-dir {run_dir} must be absolute: a relative path would land in "
                           "the job's temporary working directory and vanish with it (or set "
                           "storage=... to publish the run to shared storage)")
    return run_dir


def build_submission(args: argparse.Namespace, root: Path | None = None) -> Submission:
    """Validate ``alignx submit`` arguments and build the entrypoint + runtime env.

    The experiment config and overrides are validated here, on the client, before the cluster
    is touched (the job re-validates them).

    Raises:
        ClusterError: any bad flag or file, with the fix.
    """
    from alignx.config import AlignXConfigError, load_config

    root = root or project_root()
    stage = args.stage
    script = STAGES.get(stage)
    if script is None:
        raise ClusterError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")
    if not (root / script).is_file():
        raise ClusterError(f"stage {stage}: its launcher {script} is missing from {root}")
    flags: list[str] = []
    for dest, opt, kind in getattr(args, "stage_flags", []):
        value = getattr(args, dest, None)
        if kind == "append":
            for v in value or []:
                flags += [opt, str(v)]
        elif kind == "value" and value is not None:
            flags += [opt, str(value)]
        elif kind == "flag" and value:
            flags.append(opt)
    if stage == "train":
        if not (args.all or args.axis or args.multitask):
            raise ClusterError("say what to train: --axis AXIS (repeatable), --all, and/or "
                               "--multitask")
        from alignx.axes import parse_axis

        for a in args.axis or []:
            try:
                parse_axis(a)
            except ValueError as e:
                raise ClusterError(f"--axis: {e}") from None
    for item in args.overrides:
        if "=" not in item:
            raise ClusterError(f"override {item!r} must look like key.sub=value")
    config_rel = _relative_config(args.config, root) if args.config else None
    try:  # validate now, on the client: a typo should not cost an upload and a job
        cfg = load_config(root / config_rel if config_rel else None, list(args.overrides))
    except AlignXConfigError as e:
        raise ClusterError(str(e)) from None
    run_dir = _check_run_dir(args.run_dir, shared=getattr(cfg, "storage", None))
    renv = build_runtime_env(root, args.runtime_env, args.env or [])
    cmd = ["python", script]
    if config_rel:
        cmd += ["--config", config_rel]
    cmd += ["--run-dir", run_dir, *flags, *args.overrides]
    meta = {"alignx_stage": stage, "alignx_run_dir": run_dir}
    if config_rel:
        meta["alignx_config"] = config_rel
    return Submission(stage=stage, entrypoint=shlex.join(cmd), runtime_env=renv, metadata=meta)


# ----------------------------------------------------------------------------- talking to Ray


def resolve_address(address: str | None) -> str:
    """The dashboard URL from ``--address`` or ``$RAY_ADDRESS``.

    Raises:
        ClusterError: none given, or not an ``http(s)://`` URL.
    """
    import os

    addr = address or os.environ.get("RAY_ADDRESS")
    if not addr:
        raise ClusterError("give --address http://HEAD:8265 (the Ray dashboard) or set RAY_ADDRESS")
    if not re.match(r"^https?://[^/\s]+", addr):
        raise ClusterError(f"--address {addr!r} must be the dashboard URL, e.g. "
                           "http://127.0.0.1:8265 (not a ray:// or GCS host:6379 address)")
    return addr.rstrip("/")


def _auth_hint(address: str, err: BaseException) -> str:
    import os

    text = str(err)
    what = "refused the token" if "Authentication failed" in text or "403" in text \
        else "requires a token"
    mode = os.environ.get("RAY_AUTH_MODE", "<unset>")
    return (f"the Ray cluster at {address} {what} (RAY_AUTH_MODE={mode} here): export "
            "RAY_AUTH_MODE=token and the cluster's token as RAY_AUTH_TOKEN, or in the file "
            "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (see cluster/README.md)")


def _translate(address: str, err: BaseException) -> ClusterError:
    """Turn what Ray's client raises into one line."""
    import requests
    from ray.exceptions import AuthenticationError

    if isinstance(err, AuthenticationError):
        return ClusterError(_auth_hint(address, err))
    if isinstance(err, ConnectionError | requests.exceptions.ConnectionError):
        return ClusterError(f"cannot reach the Ray dashboard at {address}: is the cluster up "
                            "(`ray start --head` / `ray up`, or `kubectl port-forward` to port "
                            "8265)? check --address / RAY_ADDRESS")
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip(" .")]
    if not lines:
        return ClusterError(f"{address}: {type(err).__name__}")
    first = lines[0]
    if "Traceback (most recent call last)" in first:  # a server-side error: keep its last line
        first = first.split("Traceback")[0].rstrip(": ") + ": " + lines[-1].rstrip(".")
    return ClusterError(f"{address}: {first}")


@dataclass
class Cluster:
    """A connected ``JobSubmissionClient`` and the dashboard URL it talks to."""

    client: Any
    address: str

    def call(self, method: str, *a: Any, **k: Any) -> Any:
        """``client.<method>(...)``, with Ray's errors turned into one-line ClusterErrors."""
        try:
            return getattr(self.client, method)(*a, **k)
        except _client_errors() as e:
            raise _translate(self.address, e) from None


def _client_errors() -> tuple[type[BaseException], ...]:
    """What Ray's Jobs client raises for an unreachable, refusing or failing cluster."""
    import requests
    from ray.exceptions import AuthenticationError

    return (ConnectionError, AuthenticationError, RuntimeError, ValueError,
            requests.exceptions.RequestException)


def connect(address: str | None) -> Cluster:
    """A client for the cluster's Jobs API, or a one-line :class:`ClusterError`."""
    import logging

    from ray.job_submission import JobSubmissionClient

    addr = resolve_address(address)
    if log_level() != "DEBUG":  # Ray's client narrates packaging on stderr; our lines suffice
        for name in ("ray", "ray.dashboard.modules.dashboard_sdk"):  # the latter pins INFO
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return Cluster(JobSubmissionClient(addr), addr)
    except _client_errors() as e:
        raise _translate(addr, e) from None


def _stream_logs(cluster: Cluster, job_id: str) -> None:
    """Print the job's logs as they come until it ends (returns early if the stream drops)."""

    async def tail() -> None:
        async for chunk in cluster.client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except Exception as e:  # the stream broke (head restarted, proxy timeout): poll instead
        print(f"[alignx] log stream ended early ({type(e).__name__}); waiting for the job's "
              "final status", file=sys.stderr, flush=True)


def wait_for(cluster: Cluster, job_id: str, poll_s: float = 1.0) -> Any:
    """Poll until the job reaches a terminal status; returns its ``JobDetails``."""
    while True:
        info = cluster.call("get_job_info", job_id)
        if _status(info) in TERMINAL:
            return info
        time.sleep(poll_s)


def _status(info: Any) -> str:
    return str(getattr(info.status, "value", info.status))


def _duration(info: Any) -> str:
    if info.start_time and info.end_time:
        return f"{(info.end_time - info.start_time) / 1000:.1f} s"
    return "-"


def summary_line(stage: str, info: Any) -> str:
    """One line: ``job <id> (<stage>) <STATUS> in <t> s[: <first line of the message>]``."""
    status = _status(info)
    line = f"job {info.submission_id} ({stage}) {status} in {_duration(info)}"
    if status != "SUCCEEDED" and info.message:
        lines = info.message.strip().splitlines()
        line += ": " + lines[0].split(", last available logs")[0]
        errors = [x.strip() for x in lines[1:] if x.strip().startswith("error:")]
        if errors:  # the stage's own one-line diagnosis (the CLI's `error:` convention)
            line += " -- " + errors[-1]
    return line


def submit(args: argparse.Namespace) -> int:
    """``alignx submit``: returns 0 SUCCEEDED, 1 FAILED/STOPPED (or 0 with ``--no-wait``)."""
    sub = build_submission(args)
    cluster = connect(args.address)
    print(f"[alignx] submitting {sub.stage}: {sub.entrypoint}", flush=True)
    print(f"[alignx] working_dir {sub.runtime_env.get('working_dir')} -> {cluster.address}",
          flush=True)
    job_id = cluster.call("submit_job", entrypoint=sub.entrypoint,
                   runtime_env=sub.runtime_env, metadata=sub.metadata,
                   submission_id=args.submission_id,
                   entrypoint_num_cpus=args.entrypoint_num_cpus,
                   entrypoint_num_gpus=args.entrypoint_num_gpus)
    if args.no_wait:
        print(job_id, flush=True)
        print(f"[alignx] follow: alignx jobs logs {job_id} --follow; stop: alignx jobs stop "
              f"{job_id}", file=sys.stderr, flush=True)
        return 0
    print(f"[alignx] submitted {job_id}; streaming its logs (Ctrl-C detaches, the job keeps "
          "running)", flush=True)
    try:
        _stream_logs(cluster, job_id)
        info = wait_for(cluster, job_id)
    except KeyboardInterrupt:
        print(f"[alignx] detached from {job_id}, still running: alignx jobs stop {job_id}",
              file=sys.stderr)
        return 130
    line = summary_line(sub.stage, info)
    if _status(info) == "SUCCEEDED":
        print(f"[alignx] {line}", flush=True)
        return 0
    print(f"error: {line}", file=sys.stderr, flush=True)
    return 1


def _fmt_time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def jobs_table(jobs: list[Any], limit: int | None = None) -> str:
    """Submitted jobs, newest first: id, status, stage, start, end, duration, entrypoint."""
    rows = [j for j in jobs if j.submission_id]
    rows.sort(key=lambda j: j.start_time or 0, reverse=True)
    if limit:
        rows = rows[:limit]
    table = [("SUBMISSION ID", "STATUS", "STAGE", "START", "END", "DURATION", "ENTRYPOINT")]
    for j in rows:
        entry = j.entrypoint if len(j.entrypoint) <= 70 else j.entrypoint[:67] + "..."
        table.append((j.submission_id, _status(j), (j.metadata or {}).get("alignx_stage", "-"),
                      _fmt_time(j.start_time), _fmt_time(j.end_time), _duration(j), entry))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1]
                     for r in table)


def jobs(args: argparse.Namespace) -> int:
    """``alignx jobs [list|logs ID|stop ID]``."""
    cluster = connect(args.address)
    action = getattr(args, "jobs_action", None) or "list"
    if action == "list":
        print(jobs_table(cluster.call("list_jobs"), args.limit))
        return 0
    if action == "logs":
        if args.follow:
            _stream_logs(cluster, args.job_id)
        else:
            sys.stdout.write(cluster.call("get_job_logs", args.job_id))
        return 0
    stopped = cluster.call("stop_job", args.job_id)
    info = cluster.call("get_job_info", args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'} "
          f"(status {_status(info)})")
    return 0


# ----------------------------------------------------------------------------- CLI wiring


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except ClusterError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


def stage_options(stage_parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options of a stage's own command (``alignx train --all`` ...), without the common
    ``--config``/``--run-dir``/overrides: ``alignx submit STAGE`` accepts and forwards them."""
    return [a for a in stage_parser._actions
            if a.dest not in _COMMON_DESTS and a.option_strings
            and isinstance(a, argparse._StoreTrueAction | argparse._AppendAction
                           | argparse._StoreAction)]


def _add_submit_options(p: argparse.ArgumentParser, addr_help: str,
                        add_common: Callable[[argparse.ArgumentParser], None],
                        stage_parser: argparse.ArgumentParser | None) -> None:
    p.add_argument("--address", metavar="URL", help=addr_help)
    add_common(p)
    p.add_argument("--no-wait", action="store_true", help="print the submission id and return")
    p.add_argument("--runtime-env", metavar="FILE",
                   help=f"YAML merged over {RUNTIME_ENV_FILE} (env_vars/excludes merge)")
    p.add_argument("--env", action="append", metavar="NAME=VALUE",
                   help="extra env var for the job (repeatable; no secrets)")
    p.add_argument("--submission-id", metavar="ID", help="job id to use (default: generated)")
    p.add_argument("--entrypoint-num-cpus", type=float, metavar="N",
                   help="CPUs reserved for the job's driver (default 0)")
    p.add_argument("--entrypoint-num-gpus", type=float, metavar="N",
                   help="GPUs reserved for the job's driver (default 0)")
    forwarded = []
    for action in stage_options(stage_parser) if stage_parser else []:
        if any(o in p._option_string_actions for o in action.option_strings):
            raise ValueError(f"stage option {action.option_strings} clashes with alignx submit's")
        p._add_action(copy.copy(action))  # same flags, dest, type and help as the stage command
        kind = ("flag" if isinstance(action, argparse._StoreTrueAction)
                else "append" if isinstance(action, argparse._AppendAction) else "value")
        long = next((o for o in action.option_strings if o.startswith("--")),
                    action.option_strings[0])
        forwarded.append((action.dest, long, kind))
    p.set_defaults(fn=_guard(submit), stage_flags=forwarded)


def add_cluster_commands(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``alignx submit <stage>`` and ``alignx jobs`` on the CLI's subparsers."""
    addr_help = "Ray dashboard URL, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)"
    help_ = "submit a stage (or the whole pipeline) to a Ray cluster as a Ray Job"
    p = sub.add_parser(
        "submit", help=help_,
        usage="alignx submit STAGE --address URL [--config FILE] [--run-dir DIR] [KEY=VALUE ...] "
              "[--no-wait] [--runtime-env FILE] [--env NAME=VALUE] [--submission-id ID]",
        description=help_ + ": streams its logs, exits 0 when it SUCCEEDED, 1 when it FAILED or "
        "was STOPPED, 2 when it was not submitted. Token auth: export RAY_AUTH_MODE=token and "
        "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token). "
        "`alignx submit STAGE --help` lists a stage's flags.")
    stages = p.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage, script in STAGES.items():
        sp = stages.add_parser(stage, prog=f"alignx submit {stage}",
                               help=f"runs {script} on the cluster",
                               description=f"Submit `{script}` as a Ray Job.")
        _add_submit_options(sp, addr_help, add_common, sub.choices.get(stage))

    help_ = "list Ray jobs on a cluster (or show one's logs, or stop it)"
    j = sub.add_parser("jobs", help=help_, description=help_)
    j.add_argument("--address", metavar="URL", help=addr_help)
    j.add_argument("--limit", type=int, default=20, metavar="N", help="newest N jobs (default 20)")
    j.set_defaults(fn=_guard(jobs), jobs_action="list")
    actions = j.add_subparsers(dest="jobs_action", metavar="ACTION")
    lg = actions.add_parser("logs", help="print a job's logs")
    lg.add_argument("job_id", metavar="ID")
    lg.add_argument("--follow", "-f", action="store_true", help="keep streaming until it ends")
    st = actions.add_parser("stop", help="stop a running job")
    st.add_argument("job_id", metavar="ID")
    for a in (lg, st):
        a.add_argument("--address", metavar="URL", default=argparse.SUPPRESS, help=addr_help)
