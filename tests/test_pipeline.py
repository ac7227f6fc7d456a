"""`alignx pipeline` end to end on the tiny config, and its stage-by-stage resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignx.artifacts import MULTITASK, ArtifactLayout, read_json
from alignx.axes import AXES

pytestmark = pytest.mark.slow


def test_pipeline_produces_every_stage_artifact(tiny_run):
    layout = ArtifactLayout(tiny_run.run_dir)
    assert layout.config_path.is_file()
    expert_steps = 0
    for axis in AXES:
        assert layout.load_data_manifest(axis).splits["train"].count > 0
        m = layout.load_adapter_manifest(axis)
        assert m.base_model == "tiny-llama" and 1 <= m.steps <= 4 and m.eval_loss
        assert (layout.adapter_dir(axis) / "adapter_model.safetensors").is_file()
        assert (layout.adapter_dir(axis) / "config.yaml").is_file()
        expert_steps += m.steps
    mt = layout.load_adapter_manifest(MULTITASK)
    assert mt.steps == expert_steps and set(mt.axes) == set(AXES)  # the experts' total budget
    report = read_json(layout.stage1_report)
    for cond in ("injected", "plain"):
        assert set(report["answer_loss"][cond]) == {a.value for a in AXES}
        assert {"base", MULTITASK, *[a.value for a in AXES]} <= set(
            report["answer_loss"][cond]["honesty"])
    assert (layout.root / "router" / "manifest.json").is_file()
    cos = report["task_vector_cosine"]
    assert len(cos["matrix"]) == 4 and all(abs(cos["matrix"][i][i] - 1) < 1e-3 for i in range(4))


def test_rerun_skips_finished_stages(tiny_run, monkeypatch):
    import alignx.interference as interference
    import alignx.router.calibrate as calibrate
    import alignx.train.trainer as trainer
    from alignx.pipeline import run_pipeline, run_train

    layout = ArtifactLayout(tiny_run.run_dir)
    before = {a: layout.load_adapter_manifest(a).created_at for a in [*AXES, MULTITASK]}

    def boom(*a, **k):
        raise AssertionError("a finished adapter was retrained")

    monkeypatch.setattr(trainer, "train_all", boom)
    out = run_train(tiny_run, list(AXES), multitask=True)
    assert set(out) == {*[a.value for a in AXES], MULTITASK}
    assert {a: layout.load_adapter_manifest(a).created_at for a in before} == before
    # the whole pipeline again: every stage is finished, nothing is recomputed. The tiny run
    # has no evaluation (tests/eval covers the evaluation's own skip), and this test must not
    # add one to the shared run.
    monkeypatch.setattr(interference, "stage1_report", boom)
    monkeypatch.setattr(calibrate, "calibrate_router", boom)
    run_pipeline(tiny_run, evaluate=False)


# ----------------------------------------------------------------------------- interrupted


@pytest.fixture(scope="module")
def ray_head_6410(tmp_path_factory, repo_root):
    """A Ray head of our own on 127.0.0.1:6410 (`ray start --block` in a session of its own, so
    that its Ray processes stop with it), for `alignx pipeline` subprocesses to attach to.
    Worker processes still take random free ports."""
    import os
    import subprocess
    import sys
    import time

    log = tmp_path_factory.mktemp("ray-head") / "ray_start.log"
    env = os.environ | {"PYTHONPATH": str(repo_root), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--port=6410",
             # every port this head binds is its own (6410-6417, 8410): other Rays run here too
             "--ray-client-server-port=6411", "--node-manager-port=6412",
             "--object-manager-port=6413", "--dashboard-agent-listen-port=6414",
             "--dashboard-agent-grpc-port=6415", "--runtime-env-agent-port=6416",
             "--metrics-export-port=6417", "--dashboard-port=8410", "--include-dashboard=false",
             "--num-cpus=2", "--disable-usage-stats"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while b"Ray runtime started" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill_session(proc)
            pytest.fail(f"ray start failed:\n{log.read_text()}")
        time.sleep(0.5)
    yield "127.0.0.1:6410"
    _kill_session(proc)


def _kill_session(proc) -> None:
    """Stop ``proc`` and every process of the session it leads: SIGTERM, then SIGKILL."""
    import os
    import signal
    import subprocess

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the whole session is gone already
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
    proc.wait()


#: one evaluation set, not all ten: the router is the same, and each set costs this test two
#: embedding passes (tests/router/test_calibrate.py checks the full report on tiny_run)
_FEWER_SETS = ["router.evaluation_sets=[intent_set.jsonl]"]


def _pipeline(run_dir: Path, storage: str, address: str, repo_root: Path, fixtures_dir: Path):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "alignx.cli", "pipeline", "--no-evaluate",
           "-c", str(repo_root / "jobs" / "configs" / "tiny.yaml"), "-r", str(run_dir),
           f"data.data_dir={fixtures_dir}", f"storage={storage}", *_FEWER_SETS]
    env = os.environ | {"RAY_ADDRESS": address, "PYTHONPATH": str(repo_root)}
    log = run_dir.parent / "pipeline.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=repo_root)
    return proc, log


def _snapshot(fs, root: str) -> dict[str, tuple[int, int]]:
    """Every object under ``root`` on S3 with its (size, mtime)."""
    from pyarrow.fs import FileSelector, FileType

    return {i.path: (i.size, i.mtime_ns) for i in fs.get_file_info(FileSelector(root, recursive=True))
            if i.type == FileType.File}


def test_interrupted_pipeline_continues_on_another_node_from_shared_storage(
    ray_head_6410, s3_server, tmp_path, repo_root, fixtures_dir
):
    """`alignx pipeline` with storage on S3 is interrupted (SIGINT) once the experts and the
    multi-task adapter are published; rerun from an empty run_dir of the same run (another
    node, as a restarted RayJob gets), it skips every finished stage, retrains nothing,
    rewrites no published artifact, and completes the report and the router."""
    import signal
    import time

    from alignx.artifacts import ArtifactLayout, sha256_file
    from alignx.config import load_config

    storage = s3_server.uri(f"pipeline/{tmp_path.name}")
    node_a, node_b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    node_a.parent.mkdir()
    node_b.parent.mkdir()
    remote = f"{s3_server.bucket}/pipeline/{tmp_path.name}/run"
    s3 = s3_server.filesystem()
    names = [a.value for a in AXES] + [MULTITASK]

    proc, log_a = _pipeline(node_a, storage, ray_head_6410, repo_root, fixtures_dir)
    deadline = time.monotonic() + 600
    while not all(s3.get_file_info(f"{remote}/adapters/{n}/manifest.json").size for n in names):
        assert proc.poll() is None, f"pipeline ended early:\n{log_a.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log_a.read_text()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # Ctrl-C once training has published its adapters
    assert proc.wait(timeout=120) == 130, log_a.read_text()[-3000:]
    assert "interrupted; rerun the same command to resume" in log_a.read_text()
    published = _snapshot(s3, f"{remote}/adapters") | _snapshot(s3, f"{remote}/data")
    checkpoints = _snapshot(s3, f"{remote}/ray_train")
    assert any("/checkpoint_" in k for k in checkpoints)

    proc, log_b = _pipeline(node_b, storage, ray_head_6410, repo_root, fixtures_dir)
    assert proc.wait(timeout=600) == 0, log_b.read_text()[-3000:]
    out = log_b.read_text()

    # nothing finished was redone: log says so, S3 objects and checkpoints are untouched
    for n in [a.value for a in AXES]:
        assert f"adapter {n} is up to date; skipping" in out
    assert "multi-task adapter is up to date; skipping" in out
    assert "training on" not in out  # no trainer started
    for a in AXES:
        assert f"prepare {a.value}: up to date" in out
    assert _snapshot(s3, f"{remote}/ray_train") == checkpoints
    now = _snapshot(s3, f"{remote}/adapters") | _snapshot(s3, f"{remote}/data")
    assert now == published
    # node B holds byte-identical copies, and the run is complete, locally and on S3
    cfg = load_config(repo_root / "jobs" / "configs" / "tiny.yaml",
                      [f"data.data_dir={fixtures_dir}", *_FEWER_SETS], run_dir=str(node_b))
    la, lb = ArtifactLayout(node_a), ArtifactLayout(node_b)
    for n in names:
        files = sorted(p.name for p in la.adapter_dir(n).iterdir())
        assert files == sorted(p.name for p in lb.adapter_dir(n).iterdir())
        assert all(sha256_file(la.adapter_dir(n) / f) == sha256_file(lb.adapter_dir(n) / f)
                   for f in files)
    report = read_json(lb.stage1_report)
    assert report["config_hash"] == cfg.stage_hash("train")
    assert read_json(lb.root / "router" / "manifest.json")["config_hash"] == cfg.stage_hash(
        "calibrate")
    for key in ("stage1_report.json", "router/manifest.json", "config.yaml"):
        assert s3.get_file_info(f"{remote}/{key}").size > 0, key
    assert "pipeline finished" in out
