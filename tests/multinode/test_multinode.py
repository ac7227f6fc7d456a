"""Slow: AlignX on a three-node Ray cluster (head + two worker nodes on this machine).

Training:
* the three axis experts train concurrently with their workers on both worker nodes, and each
  published adapter loads with ``PeftModel`` and changes the base model's outputs;
* a two-worker trainer spans both nodes (DeepSpeed over gloo between them); SIGKILL of its
  worker process on one node makes Ray Train restart the worker group from the last registered
  checkpoint, and the run finishes with the configured step count and publishes its adapter.

Serving (last: it loses a node):
* the experts trained above are deployed from a Serve config (as ``serve deploy`` does), one
  replica each with a soft zone preference; they run on both worker nodes and each answers
  over HTTP;
* a worker node hosting experts is killed (every process at once) while client threads send
  requests; Serve reschedules the lost replicas on the surviving node and every request sent
  once they run succeeds. Failures and recovery times are recorded, not asserted.

Client policy of the load (what an OpenAI-SDK-style client does): a 60 s timeout per attempt;
a 5xx status, a timeout or a dropped connection is retried once after 1 s; a 4xx is not.
"""


from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from alignx.artifacts import ArtifactLayout
from alignx.axes import AXES, Axis
from alignx.train.loop import plan_steps

from .conftest import REPO, SERVE_PORT, ZONE_LABEL, actors

pytestmark = pytest.mark.slow


def _base_and_peft_logits(cfg, adapter_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from peft import PeftModel

    from alignx.modeling import load_base

    base, tok = load_base(cfg.model, use_gpu=False)
    ids = tok("Is the moon made of cheese?", return_tensors="pt")
    with torch.no_grad():
        before = base(**ids).logits
        model = PeftModel.from_pretrained(base, str(adapter_dir))
        after = model(**ids).logits
    return before, after


def test_three_axis_trainers_spread_over_nodes_and_publish_adapters(multinode, mn_run) -> None:
    cfg, manifests, workers = mn_run
    assert list(manifests) == [a.value for a in AXES]
    # One worker per trainer, all three placed on worker nodes, using both of them.
    assert len(workers) == 3, [(w.class_name, w.node_id) for w in workers]
    used = {multinode.name_of(w.node_id) for w in workers}
    assert used == {"node_a", "node_b"}, used
    multinode.record("train_three_axes_worker_nodes", sorted(multinode.name_of(w.node_id)
                                                             for w in workers))
    layout = ArtifactLayout(cfg.run_dir)
    for name, m in manifests.items():
        n_train = layout.load_data_manifest(Axis(name)).splits["train"].count
        assert m.steps == plan_steps(n_train, cfg.train.optim, 1)[1] >= 2
        assert m.train_loss is not None and m.eval_loss.keys() == {name}
        assert layout.adapter_manifest(name).is_file()
        torch.set_num_threads(1)
        before, after = _base_and_peft_logits(cfg, layout.adapter_dir(name))
        assert before.shape == after.shape
        assert not torch.allclose(before, after), f"{name}: the adapter leaves the base unchanged"


def _kill_worker_mid_run(mn, run_root: Path, node: str, done: threading.Event,
                        out: dict) -> None:
    """SIGKILL the Ray Train worker process that runs on ``node`` once the run has written two
    checkpoints (the controller, polling every 0.5 s, has registered the first one by then)."""
    while len(list(run_root.glob("checkpoint_*"))) < 2:
        if done.wait(0.2):
            out["error"] = f"the run ended before two checkpoints appeared under {run_root}"
            return
    time.sleep(1.0)
    victims = [w for w in actors(mn, "RayTrainWorker") if mn.name_of(w.node_id) == node]
    if not victims:
        out["error"] = f"no live Ray Train worker on {node}"
        return
    out["alive_before"] = sorted(mn.name_of(w.node_id) for w in actors(mn, "RayTrainWorker"))
    out["pid"] = victims[0].pid
    out["killed_at"] = time.time()
    os.kill(victims[0].pid, signal.SIGKILL)


def test_worker_killed_on_one_node_resumes_from_checkpoint(multinode, tmp_path) -> None:
    from alignx.config import load_config
    from alignx.data.prepare import prepare_all
    from alignx.train.trainer import run_name, train_axis

    steps = 10
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", [
        f"data.data_dir={REPO / 'tests' / 'fixtures'}", "axes=[honesty]",
        "router.fallback=honesty",
        # Two workers of 0.6 CPU do not fit on one 1-CPU node: one runs on each node.
        "train.scaling.num_workers=2", "train.scaling.cpus_per_worker=0.6",
        # 6 fixture examples, 2 per step: 3 steps an epoch; the run crosses epoch boundaries.
        "train.optim.micro_batch_size=1", "train.optim.epochs=4", f"train.optim.max_steps={steps}",
        "train.checkpoint_every=2", "train.max_failures=1",
    ], run_dir=str(tmp_path / "run"))
    prepare_all(cfg)
    layout = ArtifactLayout(cfg.run_dir)
    run_root = layout.ray_train_dir / run_name(cfg, Axis.HONESTY.value)
    killed: dict = {}
    done = threading.Event()
    killer = threading.Thread(target=_kill_worker_mid_run,
                              args=(multinode, run_root, "node_b", done, killed), daemon=True)
    killer.start()
    t0 = time.time()
    try:
        # 1 s per step: the run still goes on when it is killed, about 5 steps before its end.
        m = train_axis(cfg, Axis.HONESTY, hooks={"step_delay_s": 1.0})
    finally:
        done.set()
    seconds = time.time() - t0
    killer.join(timeout=30)
    assert "error" not in killed, killed["error"]
    assert killed.get("pid"), "the worker was never killed"
    assert killed["alive_before"] == ["node_a", "node_b"]  # the trainer spanned both nodes

    # The killed process is gone, the worker group was restarted once from a checkpoint, and
    # the run consumed every step exactly once.
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)
    state = json.loads((layout.adapter_dir("honesty") / "train_state.json").read_text())
    froms = [a["from_step"] for a in state["attempts"]]
    assert len(froms) == 2 and froms[0] == 0 and 0 < froms[1] < steps, froms
    assert froms[1] % cfg.train.checkpoint_every == 0
    assert [h["step"] for h in state["history"]] == list(range(1, steps + 1))
    assert m.steps == state["global_step"] == steps and m.num_workers == 2
    assert layout.adapter_manifest("honesty").is_file()
    before, after = _base_and_peft_logits(cfg, layout.adapter_dir("honesty"))
    assert not torch.allclose(before, after)
    restarted = state["attempts"][1]["start"]
    multinode.record("train_worker_kill", {
        "killed_on": "node_b", "resumed_from_step": froms[1], "steps": steps,
        "kill_to_restarted_worker_s": round(restarted - killed["killed_at"], 1),
        "run_seconds_with_kill": round(seconds, 1),
    })


# ----------------------------------------------------------------------------- serving


APP = "alignx"
BASE = f"http://127.0.0.1:{SERVE_PORT}"
ATTEMPT_TIMEOUT_S = 60.0
RETRY_BACKOFF_S = 1.0
THINK_S = 0.2  # pause between a client's requests
STEADY_TAIL_S = 5.0  # load kept on after recovery, all of which must succeed


#: Preferred zone (node label) per deployment. Serve's default SPREAD placement put all four
#: single-replica deployments on one node in one of three runs, so the config states a soft
#: preference, as one spreads replicas over failure domains on a real cluster: any node will do
#: when the preferred zone is gone (``fallback_strategy``).
ZONES = {"expert-helpfulness": "a", "expert-harmlessness": "b", "expert-honesty": "a",
         "router": "b"}


def _serve_config(run_dir: str, env: dict[str, str]) -> dict:
    """A Serve config (the schema of ``serve_config.yaml``) for the tiny experts, 1 replica each."""
    deployments = [{
        "name": name, "num_replicas": 1,
        "ray_actor_options": {"num_cpus": 0.1, "label_selector": {ZONE_LABEL: zone},
                              "fallback_strategy": [{"label_selector": {}}]},
        "health_check_period_s": 1.0, "health_check_timeout_s": 10.0,
        "graceful_shutdown_timeout_s": 2.0, "graceful_shutdown_wait_loop_s": 0.5,
    } for name, zone in ZONES.items()]
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": SERVE_PORT},
        "applications": [{
            "name": APP, "route_prefix": "/", "import_path": "alignx.serve.app:build_app",
            "runtime_env": {"env_vars": env},
            "args": {"run_dir": run_dir, "config": str(REPO / "jobs" / "configs" / "tiny.yaml"),
                     "routing_model": None, "default_max_tokens": 8},
            "deployments": deployments,
        }],
    }


@pytest.fixture(scope="module")
def served(multinode, mn_run):
    """The app (3 experts + router) deployed like ``serve deploy`` does: its config PUT to the
    dashboard's REST API. The HTTP proxy runs on the head."""
    from ray import serve

    cfg, _, _ = mn_run
    config = _serve_config(str(cfg.run_dir), multinode.worker_env)
    t0 = time.time()
    r = httpx.put(f"{multinode.dashboard}/api/serve/applications/", json=config, timeout=60)
    assert r.status_code == 200, r.text
    status = None
    while time.time() < t0 + 300:
        app = serve.status().applications.get(APP)
        status = app.status if app else None
        if status in ("RUNNING", "DEPLOY_FAILED"):
            break
        time.sleep(1)
    assert status == "RUNNING", serve.status().applications.get(APP)
    print(f"Serve app on the cluster ready in {time.time() - t0:.1f}s")
    yield BASE
    # No serve.shutdown(): the module's cluster goes down next with every process in it (a
    # graceful Serve shutdown after a node loss took up to 90 s on the loaded box).


def _replicas(mn) -> dict[str, list[tuple[str, int]]]:
    """``{deployment: [(node name, pid) per live replica]}`` from the state API."""
    out: dict[str, list[tuple[str, int]]] = {}
    for a in actors(mn, "", alive_only=True):
        if a.class_name.startswith(f"ServeReplica:{APP}:"):
            dep = a.class_name.split(":", 2)[2]
            out.setdefault(dep, []).append((mn.name_of(a.node_id), a.pid))
    return out


def _replica_nodes(mn) -> dict[str, list[str]]:
    """``{deployment: [node name per live replica]}``."""
    return {d: [n for n, _ in rs] for d, rs in _replicas(mn).items()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _chat(client: httpx.Client, axis: Axis) -> httpx.Response:
    return client.post(f"{BASE}/v1/chat/completions", json={
        "model": f"expert-{axis.value}", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": f"Tell me about {axis.value}."}]})


def test_expert_replicas_run_on_different_nodes(multinode, served) -> None:
    nodes = _replica_nodes(multinode)
    experts = {f"expert-{a.value}" for a in AXES}
    assert experts <= set(nodes), nodes
    assert all(len(nodes[d]) == 1 for d in experts), nodes
    expert_nodes = {nodes[d][0] for d in experts}
    assert expert_nodes == {"node_a", "node_b"}, nodes  # spread, and never on the 0-CPU head
    multinode.record("serve_replica_nodes", nodes)
    with httpx.Client(timeout=ATTEMPT_TIMEOUT_S) as client:
        for axis in AXES:
            r = _chat(client, axis)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["alignx"]["adapter"] == axis.value, body["alignx"]
            assert body["choices"][0]["finish_reason"] in ("stop", "length")


@dataclass
class _Request:
    axis: str
    start: float
    end: float
    first: int  # status of the first attempt (-1: timeout or dropped connection)
    final: int  # status after the retry policy


def _attempt(client: httpx.Client, axis: Axis) -> int:
    try:
        return _chat(client, axis).status_code
    except httpx.HTTPError:  # timeout, refused or dropped connection
        return -1


def _client_loop(axis: Axis, stop: threading.Event, log: list[_Request]) -> None:
    with httpx.Client(timeout=ATTEMPT_TIMEOUT_S) as client:
        while not stop.is_set():
            t0 = time.time()
            first = final = _attempt(client, axis)
            if first == -1 or first >= 500:  # the retry policy: once, after a pause
                time.sleep(RETRY_BACKOFF_S)
                final = _attempt(client, axis)
            log.append(_Request(axis.value, t0, time.time(), first, final))
            time.sleep(THINK_S)


def _steady(mn, lost: str) -> bool:
    """Every deployment has its replica RUNNING, none on the lost node."""
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or app.status != "RUNNING":
        return False
    if any(d.replica_states.get("RUNNING", 0) != 1 or sum(d.replica_states.values()) != 1
           for d in app.deployments.values()):
        return False
    nodes = _replica_nodes(mn)
    return len(nodes) == len(app.deployments) and all(
        lost not in ns and len(ns) == 1 for ns in nodes.values())


def test_node_loss_under_load_recovers(multinode, served, record_property) -> None:
    import ray

    before = _replicas(multinode)
    router_node = before["router"][0][0]
    expert_nodes = {d: rs[0][0] for d, rs in before.items() if d.startswith("expert-")}
    # Lose a node that runs experts; the one without the router if there is one (with the
    # router gone, every request fails until it is back, whatever its expert).
    candidates = sorted(set(expert_nodes.values()), key=lambda n: (n == router_node, n))
    victim = candidates[0]
    affected = sorted(d for d, n in expert_nodes.items() if n == victim)
    if router_node == victim:
        affected.append("router")
    victim_id = multinode.node_ids()[victim]
    # The lost replicas' processes (same machine): they outlive their raylet for a moment.
    lost_pids = [pid for rs in before.values() for n, pid in rs if n == victim]

    log: list[_Request] = []
    stop = threading.Event()
    clients = [threading.Thread(target=_client_loop, args=(a, stop, log), daemon=True)
               for a in AXES]
    try:
        for c in clients:
            c.start()
        time.sleep(3.0)  # load before the failure
        t_kill = time.time()
        multinode.remove(victim)
        dead_at = gone_at = steady_at = None
        deadline = t_kill + 180
        while time.time() < deadline:
            if dead_at is None and not any(
                    n["NodeID"] == victim_id and n["Alive"] for n in ray.nodes()):
                dead_at = time.time()
            if gone_at is None and not any(_alive(p) for p in lost_pids):
                gone_at = time.time()
            if steady_at is None and _steady(multinode, victim):
                steady_at = time.time()
            if steady_at is not None and time.time() > steady_at + STEADY_TAIL_S:
                break
            time.sleep(0.5)
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=ATTEMPT_TIMEOUT_S * 2 + 5)
    after = _replica_nodes(multinode)
    assert steady_at is not None and gone_at is not None, f"not recovered in 180 s: {after}"
    assert all(victim not in ns for ns in after.values()), after

    pre = [r for r in log if r.end < t_kill]
    assert pre and all(r.first == 200 for r in pre), "requests failed before the node loss"
    # Once the replicas run on the surviving node, every request succeeds, at once.
    tail = [r for r in log if r.start >= steady_at]
    assert tail and all(r.first == 200 for r in tail), [(r.axis, r.first) for r in tail]
    assert {r.axis for r in tail} == {a.value for a in AXES}

    during = [r for r in log if r.end >= t_kill]
    affected_axes = {d.removeprefix("expert-") for d in affected if d != "router"}
    if "router" in affected:
        affected_axes = {a.value for a in AXES}
    # Recovery of an affected axis: its first success among requests sent once the lost
    # replicas' processes were gone (so served by a new replica).
    first_ok = {a: min((r.end for r in log if r.axis == a and r.start >= gone_at
                        and r.first == 200), default=None) for a in affected_axes}
    failures = [r for r in during if r.first != 200]
    figures = {
        "lost_node": victim, "affected": affected, "clients": len(AXES),
        "requests_during_recovery": sum(r.start < steady_at for r in during),
        "raw_failures": len(failures),
        "failures_after_one_retry": sum(r.final != 200 for r in during),
        "failures_on_unaffected_axes": sum(r.axis not in affected_axes for r in failures),
        "failure_statuses": sorted({r.first for r in failures}),
        "failed_requests": [(r.axis, round(r.start - t_kill, 1), round(r.end - t_kill, 1),
                             r.first, r.final) for r in failures],
        "node_declared_dead_s": round(dead_at - t_kill, 1) if dead_at else None,
        "lost_replica_processes_gone_s": round(gone_at - t_kill, 1),
        "first_success_on_new_replica_s": {
            a: round(t - t_kill, 1) if t else None for a, t in sorted(first_ok.items())},
        "last_failure_s": round(max(r.end for r in failures) - t_kill, 1) if failures else 0.0,
        "steady_state_s": round(steady_at - t_kill, 1),
        "health_check": "GCS node check 1 s x 3, replica check 1 s",
    }
    multinode.record("serve_node_loss", figures)
    for k, v in figures.items():
        record_property(k, v)
    assert all(t is not None for t in first_ok.values()), first_ok
