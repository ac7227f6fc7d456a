"""`alignx submit` / `alignx jobs` without a cluster: argument validation, the entrypoint and
runtime env they build, and the one-line errors for bad input and unreachable clusters."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from alignx.cli import build_parser, main
from alignx.envs import looks_secret
from alignx.submit import (
    DEFAULT_EXCLUDES,
    STAGES,
    ClusterError,
    build_submission,
    jobs_table,
    merge_runtime_env,
    resolve_address,
    stage_options,
    summary_line,
)

REPO = Path(__file__).resolve().parents[2]


def _args(*argv: str):
    return build_parser().parse_args(["submit", *argv])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_stage_maps_to_a_launcher_with_the_cli_convention():
    for stage, script in STAGES.items():
        path = REPO / script
        if stage == "evaluate" and not path.exists():
            continue  # jobs/evaluate.py lands with the evaluation harness
        text = path.read_text()
        assert "from alignx.cli import main" in text and "sys.argv[1:]" in text, script


def test_prepare_entrypoint_and_runtime_env(tmp_path):
    sub = build_submission(_args("prepare", "--address", "http://h:8265", "-c",
                                 "jobs/configs/tiny.yaml", "-r", str(tmp_path),
                                 "data.data_dir=tests/fixtures"), REPO)
    assert sub.entrypoint == (f"python jobs/prepare_data.py --config jobs/configs/tiny.yaml "
                              f"--run-dir {tmp_path} data.data_dir=tests/fixtures")
    env = sub.runtime_env
    assert env["working_dir"] == str(REPO)  # the project root, whatever the cwd
    assert set(DEFAULT_EXCLUDES) <= set(env["excludes"]) and "runs/" in env["excludes"]
    shipped = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert env["env_vars"] == shipped["env_vars"]
    assert sub.metadata == {"alignx_stage": "prepare", "alignx_run_dir": str(tmp_path),
                            "alignx_config": "jobs/configs/tiny.yaml"}


def test_train_flags_pass_through_and_are_required(tmp_path):
    sub = build_submission(_args("train", "-c", "jobs/configs/tiny.yaml", "-r", str(tmp_path),
                                 "--axis", "honesty", "--axis", "helpfulness", "--multitask",
                                 "--force", "train.lora.rank=8"), REPO)
    assert sub.entrypoint.startswith("python jobs/train_axis.py --config jobs/configs/tiny.yaml")
    assert "--axis honesty --axis helpfulness --multitask --force train.lora.rank=8" in sub.entrypoint
    with pytest.raises(ClusterError, match="say what to train"):
        build_submission(_args("train", "-r", str(tmp_path)), REPO)
    with pytest.raises(SystemExit):  # --all is a train flag, not a prepare one
        _args("prepare", "-r", str(tmp_path), "--all")


def test_submit_stage_accepts_and_forwards_the_stage_commands_own_flags(tmp_path):
    """`alignx submit STAGE` takes exactly the options of `alignx STAGE` (besides the common
    ones) and forwards each to the launcher, so the two cannot drift."""
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    submit = next(a for a in commands["submit"]._actions if a.dest == "stage").choices
    assert set(submit) == set(STAGES)
    for stage in STAGES:
        own = stage_options(commands[stage]) if stage in commands else []
        argv = []
        for a in own:
            if a.nargs == 0:
                argv.append(a.option_strings[-1])
            else:
                argv += [a.option_strings[-1], "honesty" if a.dest == "axis" else "x"]
        sub = build_submission(_args(stage, "-r", str(tmp_path), *argv), REPO)
        forwarded = shlex.split(sub.entrypoint)
        for a in own:
            assert any(o in forwarded for o in a.option_strings), (stage, a.option_strings)
    assert {"--all", "--axis", "--multitask", "--force"} <= {
        o for a in stage_options(commands["train"]) for o in a.option_strings}


@pytest.mark.parametrize("argv, message", [
    (["prepare"], "give --run-dir"),
    (["prepare", "-r", "runs/x"], "--run-dir runs/x must be absolute"),
    (["train", "-r", "/abs", "--axis", "kindness"], "--axis: unknown axis 'kindness'"),
    (["prepare", "-r", "/abs", "-c", "/etc/hostname"], "outside the project"),
    (["prepare", "-r", "/abs", "-c", "jobs/configs/nope.yaml"], "no such file"),
    (["prepare", "-r", "/abs", "train.lora.rnak=3"], "train.lora.rnak: unknown key"),
    (["prepare", "-r", "/abs", "--env", "NOVALUE"], "--env 'NOVALUE' must look like NAME=VALUE"),
    (["prepare", "-r", "/abs", "--env", "OPENAI_API_KEY=sk-x"], "OPENAI_API_KEY looks like a secret"),
    (["prepare", "-r", "/abs", "--runtime-env", "/nonexistent.yaml"], "--runtime-env"),
])
def test_bad_arguments_name_the_flag_and_the_fix(argv, message):
    with pytest.raises(ClusterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_submission(_args(*argv), REPO)


def test_runtime_env_file_merges_over_the_shipped_one(tmp_path):
    user = tmp_path / "env.yaml"
    user.write_text("env_vars: {ALIGNX_DATA_DIR: /mnt/shared/data, ALIGNX_LOG_LEVEL: DEBUG}\n"
                    "excludes: [notes/]\npip: [rich]\n")
    sub = build_submission(_args("prepare", "-r", "s3://bucket/run", "--runtime-env", str(user),
                                 "--env", "HF_HUB_OFFLINE=1"), REPO)
    env = sub.runtime_env
    assert env["env_vars"]["ALIGNX_DATA_DIR"] == "/mnt/shared/data"
    assert env["env_vars"]["ALIGNX_LOG_LEVEL"] == "DEBUG"       # the user's file wins
    assert env["env_vars"]["RAY_AUTH_MODE"] == "token"          # the shipped keys stay
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert "notes/" in env["excludes"] and "runs/" in env["excludes"] and env["pip"] == ["rich"]
    assert "--run-dir s3://bucket/run" in sub.entrypoint


def test_relative_run_dir_is_fine_when_the_run_is_published_to_storage():
    from alignx.config import AlignXConfig

    if "storage" not in AlignXConfig.model_fields:
        pytest.skip("the storage setting lands with the shared-storage work")
    sub = build_submission(_args("prepare", "-r", "runs/x", "storage=s3://bucket/alignx"), REPO)
    assert "--run-dir runs/x storage=s3://bucket/alignx" in sub.entrypoint


def test_merge_runtime_env_rules():
    base = {"env_vars": {"A": "1"}, "excludes": ["x"], "pip": ["a"]}
    out = merge_runtime_env(base, {"env_vars": {"B": "2"}, "excludes": ["x", "y"], "pip": ["b"]})
    assert out == {"env_vars": {"A": "1", "B": "2"}, "excludes": ["x", "y"], "pip": ["b"]}
    assert base["env_vars"] == {"A": "1"}  # not mutated


@pytest.mark.parametrize("name, secret", [
    ("OPENAI_API_KEY", True), ("HF_TOKEN", True), ("RAY_AUTH_TOKEN", True), ("DB_PASSWORD", True),
    ("AWS_SECRET_ACCESS_KEY", True), ("ALIGNX_API_KEY", True),
    ("RAY_AUTH_TOKEN_PATH", False), ("RAY_AUTH_MODE", False), ("TOKENIZERS_PARALLELISM", False),
    ("HF_HUB_OFFLINE", False), ("ALIGNX_DATA_DIR", False), ("KEYBOARD", False),
])
def test_looks_secret(name, secret):
    assert looks_secret(name) is secret


def test_address_resolution(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ClusterError, match="give --address"):
        resolve_address(None)
    for bad in ("127.0.0.1:8265", "ray://head:10001", "auto"):
        with pytest.raises(ClusterError, match="must be the dashboard URL"):
            resolve_address(bad)
    assert resolve_address("http://h:8265/") == "http://h:8265"
    monkeypatch.setenv("RAY_ADDRESS", "https://ray.example.com")
    assert resolve_address(None) == "https://ray.example.com"


def test_unreachable_cluster_is_one_error_line(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    url = f"http://127.0.0.1:{_free_port()}"
    assert main(["jobs", "--address", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach the Ray dashboard at {url}") and err.count("\n") == 1
    assert main(["submit", "prepare", "--address", url, "-c", "jobs/configs/tiny.yaml",
                 "-r", "/tmp/alignx-never"]) == 2
    assert "error: cannot reach the Ray dashboard" in capsys.readouterr().err
    assert main(["jobs", "logs", "raysubmit_x", "--address", url]) == 2


def test_cli_errors_exit_2_without_traceback():
    for argv, says in ((["submit", "bogus", "--address", "http://127.0.0.1:1"],
                        "invalid choice: 'bogus'"),
                       (["submit", "prepare", "--address", "ray://h:10001", "-r", "/abs"],
                        "error: --address 'ray://h:10001' must be the dashboard URL")):
        r = subprocess.run([sys.executable, "-m", "alignx.cli", *argv], capture_output=True,
                           text=True, timeout=120, cwd=REPO)
        assert r.returncode == 2, r.stderr
        assert says in r.stderr and "Traceback" not in r.stderr


def _job(sid, status, start, end=None, stage="prepare", message=None, entry="python jobs/x.py"):
    return SimpleNamespace(submission_id=sid, status=status, start_time=start, end_time=end,
                           metadata={"alignx_stage": stage} if stage else {}, message=message,
                           entrypoint=entry)


def test_summary_line_names_status_and_the_stages_error():
    ok = _job("raysubmit_a", "SUCCEEDED", 1000, 3500)
    assert summary_line("prepare", ok) == "job raysubmit_a (prepare) SUCCEEDED in 2.5 s"
    bad = _job("raysubmit_b", "FAILED", 1000, 2000, message=(
        "Job entrypoint command failed with exit code 2, last available logs (truncated):\n"
        "INFO starting\nerror: /d/alpaca: no alpaca data for split 'train'\n"))
    line = summary_line("prepare", bad)
    assert line == ("job raysubmit_b (prepare) FAILED in 1.0 s: Job entrypoint command failed "
                    "with exit code 2 -- error: /d/alpaca: no alpaca data for split 'train'")
    assert "\n" not in line


def test_jobs_table_newest_first_with_limit_and_no_driver_rows():
    rows = [_job("raysubmit_old", "SUCCEEDED", 1_000_000, 1_002_000),
            _job("raysubmit_new", "RUNNING", 2_000_000, None, stage="train", entry="python " + "y" * 80),
            _job(None, "SUCCEEDED", 3_000_000, stage=None)]  # a plain driver, not a submission
    lines = jobs_table(rows).splitlines()
    assert lines[0].split()[:3] == ["SUBMISSION", "ID", "STATUS"]
    assert [ln.split()[0] for ln in lines[1:]] == ["raysubmit_new", "raysubmit_old"]
    assert "RUNNING" in lines[1] and "train" in lines[1] and lines[1].endswith("...")
    assert "2.0 s" in lines[2]
    assert len(jobs_table(rows, limit=1).splitlines()) == 2


def test_a_server_side_traceback_becomes_its_last_line():
    from alignx.submit import _translate

    err = RuntimeError("Request failed with status code 500: Traceback (most recent call last):\n"
                       '  File "x.py", line 1, in f\n'
                       "ValueError: Job with submission_id a already exists. Use another one.\n.")
    msg = str(_translate("http://h:8265", err))
    assert msg == ("http://h:8265: Request failed with status code 500: ValueError: Job with "
                   "submission_id a already exists. Use another one")
