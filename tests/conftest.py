"""Shared fixtures. Nothing here touches a model hub: tiny models are built in-process."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"

# Environment for every test and every Ray worker they start (ENVIRONMENT.md explains each).
_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "DS_ACCELERATOR": "cpu",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_V2_ENABLED": os.environ.get("RAY_TRAIN_V2_ENABLED", "1"),
    # fake credentials for the loopback S3 server of `s3_server` (set before Ray starts, so
    # that Ray Train's controller and workers see them too); no instance-metadata lookups
    "AWS_ACCESS_KEY_ID": "alignx-test",
    "AWS_SECRET_ACCESS_KEY": "alignx-test",
    "AWS_EC2_METADATA_DISABLED": "true",
}
for _k, _v in _ENV.items():
    os.environ.setdefault(_k, _v)
# A session-private model cache unless the caller chose one (CI reuses ~/.cache/alignx).
os.environ.setdefault("ALIGNX_CACHE_DIR", tempfile.mkdtemp(prefix="alignx-cache-"))


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


def worker_env_vars() -> dict[str, str]:
    """Env vars for every Ray worker of a test session: the project's, plus this checkout on
    ``PYTHONPATH``."""
    from alignx.envs import ray_runtime_env_vars

    env = ray_runtime_env_vars()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return env


def forget_serve_client() -> None:
    """Drop the Serve controller handle this process cached for an earlier Ray instance.

    Serve keys its cached client by the driver's job id, and the first driver of every new
    Ray instance gets the same id (``01000000``): after ``ray.shutdown()`` and ``ray.init()``
    against another cluster, ``serve.status()`` would call the old instance's dead controller
    ("Can't find actor ... from a different cluster"). Call after every switch of cluster.
    """
    from ray.serve import context

    context._set_global_client(None)


def start_local_ray() -> None:
    """Start the session's local Ray (2 CPUs, dashboard on loopback for Jobs/Serve)."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env={"env_vars": worker_env_vars()},
        log_to_driver=False,
    )
    forget_serve_client()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (see :func:`start_local_ray`)."""
    import ray

    if not ray.is_initialized():
        start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_run(ray_local, tmp_path_factory):
    """One trained tiny run directory for every slow test that needs artifacts: `alignx pipeline`
    on jobs/configs/tiny.yaml + the fixture data (3 experts + multi-task adapter + stage-1 report).

    Returns the resolved config; its ``run_dir`` holds the artifacts. Tests must not modify it.
    """
    from alignx.config import DEFAULT_ANCHOR_WEIGHT, load_config
    from alignx.pipeline import run_pipeline

    run_dir = tmp_path_factory.mktemp("tiny-run")
    # two fine-tunes averaged, as the default does (router.finetune_anchor, which tiny.yaml
    # turns off), on this shared run only: the anchor on the first of tiny.yaml's seed files,
    # at the default's weight; the other tiny runs keep one fine-tune
    anchor = ("router.finetune_anchor={seed_sets: [intent_seeds.jsonl], "
              f"weight: {DEFAULT_ANCHOR_WEIGHT}}}")
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml",
                      [f"data.data_dir={FIXTURES}", anchor], run_dir=str(run_dir))
    run_pipeline(cfg, evaluate=False)  # tests/eval/test_harness_serve.py evaluates it
    return cfg


@pytest.fixture(scope="session")
def gated_run(tiny_run, tmp_path_factory):
    """A copy of the tiny run (tests must not modify ``tiny_run``) with trained H3Fusion gates:
    ``(cfg, gates manifest)``. Tests must not modify it either; copy it to change it."""
    import shutil

    from alignx.baselines.h3fusion import train_h3fusion

    run = tmp_path_factory.mktemp("h3f") / "run"
    shutil.copytree(tiny_run.run_dir, run, ignore=shutil.ignore_patterns("ray_train"))
    cfg = tiny_run.model_copy(update={"run_dir": str(run)})
    return cfg, train_h3fusion(cfg)


class S3Server:
    """A running S3-compatible server on loopback with one bucket (see ``s3_server``)."""

    def __init__(self, port: int, bucket: str):
        self.endpoint = f"127.0.0.1:{port}"
        self.bucket = bucket

    def uri(self, prefix: str) -> str:
        """``s3://<bucket>/<prefix>`` with this server as the endpoint (a ``storage`` value)."""
        return f"s3://{self.bucket}/{prefix}?endpoint_override={self.endpoint}&scheme=http"

    def filesystem(self):
        """A pyarrow ``S3FileSystem`` on this server (paths are ``<bucket>/<key>``)."""
        from pyarrow.fs import S3FileSystem

        return S3FileSystem(endpoint_override=self.endpoint, scheme="http")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server (``moto[server]``, a real HTTP S3 API) on a free loopback port, with the
    bucket ``alignx-test``; its log is in a temp folder and is shown if it fails to start."""
    import socket
    import subprocess
    import sys
    import time

    from pyarrow.fs import S3FileSystem

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto_server did not start on port {port}:\n{log.read_text()}")
            time.sleep(0.2)
    server = S3Server(port, "alignx-test")
    S3FileSystem(endpoint_override=server.endpoint, scheme="http",
                 allow_bucket_creation=True).create_dir(server.bucket)
    yield server
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
