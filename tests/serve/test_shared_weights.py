"""Slow: the base-weights store on a real Ray node (alignx.serve.weights).

Two Ray actors build the model on the shared weights and must compute the same logits; the
store actor that owns the weights must not carry torch, and the one-shot task that loaded
them must leave no worker process behind.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_replicas_share_one_store_copy_and_the_store_carries_no_torch(ray_local, tiny_model_cfg):
    import ray
    from ray.util.state import list_actors, list_tasks

    from alignx.serve.weights import NAMESPACE, _store_name

    @ray.remote(num_cpus=0)
    class Holder:
        def __init__(self, cfg: dict):
            from alignx.config import ModelCfg
            from alignx.serve.weights import shared_base_loader

            self.model, self.tok = shared_base_loader(ModelCfg(**cfg))()

        def probe(self) -> tuple[int, float]:
            import os

            import torch

            x = self.tok(["hello world"], return_tensors="pt")
            with torch.no_grad():
                return os.getpid(), float(self.model(**x).logits[0, -1, 0])

    cfg = tiny_model_cfg.model_dump()
    holders = [Holder.remote(cfg) for _ in range(2)]
    try:
        (pid_a, logit_a), (pid_b, logit_b) = ray.get([h.probe.remote() for h in holders],
                                                     timeout=180)
        assert pid_a != pid_b and logit_a == pytest.approx(logit_b)
        node = ray.get_runtime_context().get_node_id()
        store = ray.get_actor(_store_name(tiny_model_cfg, node), namespace=NAMESPACE)
        assert ray.get(store.size.remote()) > 0
        gcs = ray.get_runtime_context().gcs_address
        # this layout's store (other tests' apps may leave the numpy engine's store alive)
        [info] = list_actors(address=gcs, filters=[
            ("class_name", "=", "BaseWeightsStore"), ("state", "=", "ALIVE"),
            ("name", "=", _store_name(tiny_model_cfg, node))])
        assert "libtorch" not in _maps(info.pid)  # the store never imported torch
        # the loading task finished and its worker exited (max_calls=1): no process is left
        # holding torch and the model on the store's behalf; the arrays live on with the store
        # (every store's loading task: other tests' apps may have loaded the numpy layout)
        tasks = list_tasks(address=gcs, filters=[("func_or_class_name", "=",
                                                  "load_base_arrays")])
        assert tasks
        deadline = time.time() + 30
        while time.time() < deadline and any(Path(f"/proc/{t.worker_pid}").exists()
                                             for t in tasks):
            time.sleep(0.5)
        for task in tasks:
            assert task.state == "FINISHED"
            assert not Path(f"/proc/{task.worker_pid}").exists()
    finally:
        for h in holders:
            ray.kill(h)
        try:
            ray.kill(ray.get_actor(_store_name(tiny_model_cfg,
                                               ray.get_runtime_context().get_node_id()),
                                   namespace=NAMESPACE))
        except ValueError:
            pass
