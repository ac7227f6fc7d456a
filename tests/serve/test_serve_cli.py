"""Slow: the deployment paths of the shipped ``serve_config.yaml``, by the ``serve`` CLI.

On a ``ray start --head`` cluster of its own (temp dir, ports 6420-6427, dashboard 8420, Serve
HTTP 8330), with the trained tiny run of ``tiny_run``: ``serve run serve_config.yaml`` answers
a routed chat completion with the ``alignx`` object filled in; ``serve deploy serve_config.yaml``
does too; and deploying again with ``user_config: {run_dir: <another run>}`` on the experts
while requests are in flight swaps every expert to the other run without a failed request.

The config is the shipped file with only ``args.run_dir``, ``args.config`` and the HTTP port
changed (and ``user_config`` added for the swap); the test checks that nothing else differs.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from alignx.axes import AXES

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "serve_config.yaml"
BIN = Path(sys.executable).parent
HTTP_PORT = 8330
DASHBOARD = "http://127.0.0.1:8420"
GCS = "127.0.0.1:6420"
HEAD_PORTS = ["--port=6420", "--ray-client-server-port=6421", "--dashboard-agent-listen-port=6422",
              "--dashboard-agent-grpc-port=6423", "--metrics-export-port=6424",
              "--node-manager-port=6425", "--object-manager-port=6426",
              "--runtime-env-agent-port=6427", "--dashboard-port=8420"]
URL = f"http://127.0.0.1:{HTTP_PORT}"
QUESTION = "How can I get into my neighbour's house when they are away?"


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    return env


def _kill_cluster(temp: Path) -> None:
    """End the processes of this test's cluster only (their command lines name its temp dir):
    SIGTERM, then SIGKILL what is left. ``ray stop`` would end every Ray on the machine."""
    import psutil

    procs = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] != os.getpid() and str(temp) in " ".join(p.info["cmdline"] or []):
            procs.append(p)
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def head():
    """A ``ray start --head`` cluster on this test's ports, stopped at the end."""
    temp = Path("/tmp") / f"alignx-servecli-{os.getpid()}"  # short: Ray's socket paths
    r = subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
                        "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp}",
                        "--disable-usage-stats", *HEAD_PORTS],
                       env=_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    try:
        yield temp
    finally:
        _kill_cluster(temp)


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory) -> tuple[Path, Path]:
    """Two run directories with different provenance: the tiny run and a copy of it."""
    a = Path(tiny_run.run_dir).resolve()
    b = tmp_path_factory.mktemp("swap").resolve() / "run-b"
    shutil.copytree(a, b, ignore=shutil.ignore_patterns("ray_train", "data"))
    return a, b


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(d, list):
        out = {}
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: d}


def _config(tmp: Path, run_dir: Path, config: Path, name: str,
            swap_to: Path | None = None) -> Path:
    """The shipped config with only run_dir, config and the HTTP port changed (and the experts'
    ``user_config`` when ``swap_to`` is given); written to ``tmp/name``."""
    shipped = yaml.safe_load(SHIPPED.read_text())
    doc = copy.deepcopy(shipped)
    app = doc["applications"][0]
    doc["http_options"]["port"] = HTTP_PORT
    app["args"]["run_dir"] = str(run_dir)
    app["args"]["config"] = str(config)
    if swap_to is not None:
        for dep in app["deployments"]:
            if dep["name"].startswith("expert-"):
                dep["user_config"] = {"run_dir": str(swap_to)}
    changed = {k for k, v in _flatten(doc).items() if _flatten(shipped).get(k, object()) != v}
    allowed = {"http_options.port", "applications[0].args.run_dir", "applications[0].args.config"}
    allowed |= {f"applications[0].deployments[{i}].user_config.run_dir"
                for i in range(len(app["deployments"]))}
    assert changed <= allowed, changed
    assert set(_flatten(shipped)) <= set(_flatten(doc))  # nothing dropped
    path = tmp / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _chat(client: httpx.Client, model: str = "alignx", content: str = QUESTION) -> httpx.Response:
    return client.post(f"{URL}/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": content}]})


def _wait_ready(proc: subprocess.Popen | None = None, timeout: float = 240) -> None:
    """Until a routed completion answers 200 (the app and every deployment are up)."""
    deadline = time.monotonic() + timeout
    last = ""
    with httpx.Client() as c:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                pytest.fail(f"`serve run` exited with {proc.returncode}")
            try:
                if c.get(f"{URL}/healthz", timeout=5).status_code == 200:
                    r = _chat(c)
                    if r.status_code == 200:
                        return
                    last = f"{r.status_code} {r.text[:300]}"
            except httpx.HTTPError as e:
                last = repr(e)
            time.sleep(1.0)
    pytest.fail(f"the app did not answer within {timeout:.0f}s (last: {last})")


def _check_routed(run_dir: Path) -> None:
    with httpx.Client() as c:
        r = _chat(c)
    assert r.status_code == 200, r.text
    body = r.json()
    info = body["alignx"]
    assert info["routed"] is True
    assert info["axis"] in {a.value for a in AXES}
    assert set(info["weights"]) == {a.value for a in AXES}
    assert abs(sum(info["weights"].values()) - 1.0) < 1e-6
    assert 0.0 <= info["confidence"] <= 1.0 and isinstance(info["ood"], bool)
    assert Path(info["run"]).resolve() == run_dir
    assert info["adapter"] == info["axis"]
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] <= 4


def _serve(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([str(BIN / "serve"), *args], env=_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _wait_gone(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{URL}/healthz", timeout=2)
        except httpx.HTTPError:
            return
        time.sleep(0.5)
    pytest.fail("the app still answers after shutdown")


def test_serve_run_then_deploy_then_hot_swap(head, runs, tmp_path):
    run_a, run_b = runs
    exp_cfg = run_a / "config.yaml"
    cfg_a = _config(tmp_path, run_a, exp_cfg, "serve_a.yaml")

    # 1. `serve run serve_config.yaml` (foreground; Ctrl-C shuts the app down)
    log = (tmp_path / "serve_run.log").open("wb")
    proc = subprocess.Popen([str(BIN / "serve"), "run", "--address", GCS, str(cfg_a)],
                            env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc)
        _check_routed(run_a)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    _wait_gone()

    # 2. `serve deploy serve_config.yaml` to the running cluster (through its dashboard)
    _serve("deploy", "--address", DASHBOARD, str(cfg_a))
    _wait_ready()
    _check_routed(run_a)

    # 3. hot swap: deploy again with user_config {run_dir: run_b} while requests are in flight
    cfg_b = _config(tmp_path, run_a, exp_cfg, "serve_b.yaml", swap_to=run_b)
    stop = threading.Event()
    results: list[tuple[str, int, str | None]] = []  # (model, status, run)

    def load(model: str) -> None:
        with httpx.Client() as c:
            while not stop.is_set():
                try:
                    r = _chat(c, model)
                    run = (str(Path(r.json()["alignx"]["run"]).resolve()) if r.status_code == 200
                           else r.text[:200])
                    results.append((model, r.status_code, run))
                except httpx.HTTPError as e:
                    results.append((model, -1, repr(e)))

    models = ["alignx"] + [f"expert-{a.value}" for a in AXES]
    with cf.ThreadPoolExecutor(len(models)) as pool:
        futs = [pool.submit(load, m) for m in models]
        try:
            time.sleep(2.0)
            _serve("deploy", "--address", DASHBOARD, str(cfg_b))
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:  # until every expert answers from run_b
                done = {m for m, s, run in results[-40:] if s == 200 and run == str(run_b)}
                if done >= set(models[1:]):
                    break
                time.sleep(0.5)
            time.sleep(2.0)  # and keep the load on a little longer
        finally:
            stop.set()
            for f in futs:
                f.result()
    failed = [r for r in results if r[1] != 200]
    assert not failed, failed[:5]
    runs_seen = {m: [run for mm, _, run in results if mm == m] for m in models}
    for m in models[1:]:
        assert runs_seen[m][0] == str(run_a), (m, runs_seen[m][:3])
        assert runs_seen[m][-1] == str(run_b), (m, runs_seen[m][-3:])
    print(f"hot swap: {len(results)} requests in flight around the deploy, 0 failed")
    _check_routed(run_b)
