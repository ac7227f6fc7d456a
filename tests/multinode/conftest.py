"""Fixtures of the multi-node tests: a head plus two worker nodes on this machine.

``ray.cluster_utils.Cluster`` starts real Ray nodes (one GCS, one raylet + object store per
node) on loopback. The head has no CPUs, so every training worker and Serve replica runs on a
worker node; each worker node has 1 CPU, its own custom resource (``node_a`` / ``node_b``),
which names it in the state API's resource view, and a zone label (``alignx-zone``: a / b). Node liveness is checked every second (Ray's
default is 3 s x 5 misses), so a removed node is declared dead in a few seconds.

Ports: GCS 6310, dashboard 8311 (the state API goes through it), Serve HTTP 8310; the rest are
picked by the OS. The fixtures are module-scoped (all multi-node tests live in one module): if
the session already runs the single-node ``ray_local`` Ray, it is stopped for that module and
started again afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
GCS_PORT = 6310
DASHBOARD_PORT = 8311
SERVE_PORT = 8310
#: Node label of a worker node's failure domain (on a cloud: its zone).
ZONE_LABEL = "alignx-zone"
#: Worker nodes: 1 CPU each, a resource that names the node and a zone label.
WORKER_NODES: dict[str, dict[str, Any]] = {
    "node_a": {"num_cpus": 1, "resources": {"node_a": 1.0}, "labels": {ZONE_LABEL: "a"}},
    "node_b": {"num_cpus": 1, "resources": {"node_b": 1.0}, "labels": {ZONE_LABEL: "b"}},
}
#: GCS node health checks: every 1 s, dead after 3 misses (Ray's defaults: 3 s, 5 misses).
HEALTH_CHECK = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                "health_check_failure_threshold": 3}


_RESULTS: list[Path] = []


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the figures the multi-node tests measured (they assert behaviour, not timings)."""
    for path in _RESULTS:
        if path.exists():
            terminalreporter.section("multi-node reliability figures")
            terminalreporter.write_line(f"{path}:")
            terminalreporter.write_line(path.read_text())


def _root_conftest() -> Any:
    spec = importlib.util.spec_from_file_location("alignx_root_conftest",
                                                  REPO / "tests" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@dataclass
class MultiNode:
    """The running cluster: ``nodes`` maps a worker node's name to its Ray ``Node``."""

    cluster: Any
    nodes: dict[str, Any]
    head_id: str
    results: Path
    #: env vars of every Ray worker (the project's + this checkout on ``PYTHONPATH``).
    worker_env: dict[str, str] = field(default_factory=dict)
    #: ``{node id: name}`` of every worker node this fixture started, removed ones included.
    known: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{DASHBOARD_PORT}"

    def node_ids(self) -> dict[str, str]:
        """``{node name: node id}`` of the worker nodes started by this fixture."""
        return {n: node.node_id for n, node in self.nodes.items()}

    def name_of(self, node_id: str) -> str:
        """The worker node's name (``node_a``...), ``head``, or the id itself if unknown."""
        return "head" if node_id == self.head_id else self.known.get(node_id, node_id)

    def remove(self, name: str) -> None:
        """Kill every process of worker node ``name`` at once, as a machine failure would."""
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)

    def add(self, name: str) -> None:
        """Start worker node ``name`` (again: a replacement gets a new node id)."""
        node = self.cluster.add_node(node_ip_address="127.0.0.1", **WORKER_NODES[name])
        self.nodes[name] = node
        self.known[node.node_id] = name

    def record(self, key: str, value: Any) -> None:
        """Add measured figures to ``reliability.json`` in this session's tmp dir (and print)."""
        data = json.loads(self.results.read_text()) if self.results.exists() else {}
        data[key] = value
        self.results.write_text(json.dumps(data, indent=2) + "\n")
        print(f"reliability[{key}] = {json.dumps(value)}  (all figures: {self.results})")


def actors(mn: MultiNode, class_suffix: str, alive_only: bool = True) -> list[Any]:
    """Actors of this cluster whose class name ends with ``class_suffix`` (state API)."""
    from ray.util.state import list_actors

    filters = [("state", "=", "ALIVE")] if alive_only else []
    found = list_actors(address=mn.address, filters=filters, limit=10_000, detail=True,
                        raise_on_missing_output=False)
    return [a for a in found if a.class_name.endswith(class_suffix)]


@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    """Head (0 CPUs) + ``node_a`` + ``node_b`` (1 CPU each); the driver connects to the head."""
    import ray
    from ray.cluster_utils import Cluster

    from alignx.train.engine import prebuild_cpu_ops

    prebuild_cpu_ops()  # DeepSpeed's CPU comm op, once, before workers on two nodes need it
    root = _root_conftest()
    had_local_ray = ray.is_initialized()
    if had_local_ray:  # one driver, one cluster: park the session's local Ray
        ray.shutdown()
    # The driver passes these to Ray Train's controller and workers: poll workers every 0.5 s.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    t0 = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "gcs_server_port": GCS_PORT,
        "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": DASHBOARD_PORT, "dashboard_agent_listen_port": None,
        "_system_config": HEALTH_CHECK})
    mn = MultiNode(cluster, {}, cluster.head_node.node_id,
                   tmp_path_factory.getbasetemp() / "reliability.json", root.worker_env_vars())
    _RESULTS.append(mn.results)
    try:
        for name in WORKER_NODES:
            mn.add(name)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env={"env_vars": mn.worker_env},
                 log_to_driver=False)
        root.forget_serve_client()  # Serve's handle to the parked local Ray's controller
        print(f"multi-node cluster up in {time.time() - t0:.1f}s: {mn.node_ids()}")
        yield mn
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_local_ray:
            root.start_local_ray()


@pytest.fixture(scope="module")
def mn_run(multinode, tmp_path_factory):
    """The three axis experts of ``jobs/configs/tiny.yaml`` trained on the multi-node cluster.

    Data: ``alignx prepare`` on ``tests/fixtures``. Each trainer has one worker of 0.4 CPU, so a
    1-CPU node holds at most two of the three: the scheduler has to use both worker nodes.
    Returns ``(cfg, manifests, workers)``; ``workers`` are the Ray Train worker actors of the run
    (from the state API, dead ones included).
    """
    from alignx.config import load_config
    from alignx.data.prepare import prepare_all
    from alignx.train.trainer import train_all

    run_dir = tmp_path_factory.mktemp("mn-run")
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml",
                      [f"data.data_dir={REPO / 'tests' / 'fixtures'}",
                       "train.scaling.cpus_per_worker=0.4"], run_dir=str(run_dir))
    prepare_all(cfg)
    t0 = time.time()
    manifests = train_all(cfg)
    print(f"three experts trained on the multi-node cluster in {time.time() - t0:.1f}s")
    workers = actors(multinode, "RayTrainWorker", alive_only=False)
    return cfg, manifests, workers
