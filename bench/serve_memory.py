"""Serving benchmark: memory of the expert replicas with and without a shared base model.

Deploys the AlignX app on a local Ray node three times and reads the proportional set size
(PSS, /proc/<pid>/smaps_rollup) of every expert replica process after one request each:

  shared-3   three experts, base weights shared through the object store (share_base_weights)
  private-1  one expert that loads its own copy (the unit of comparison)
  private-3  three experts with private copies (the naive layout, for reference)

each with the torch engine (transformers generate) and the torch-free numpy engine
(``--engine both``, the default, measures both side by side in one run). Each layout is compared
with one private replica of the same engine, and with one private torch replica.

PSS splits each shared page between the processes mapping it, so it is the right measure of
what each replica costs on the node. It is reported split into anonymous memory (the
process's own heap: Python, torch, transformers, tokenizer, activations), shared memory (the
object-store weights) and file pages (libraries; a private copy's safetensors mmap). The
weight-store actor (it owns the object-store copy but neither maps it nor imports torch) is
reported separately: "+store" is the ratio with its PSS added.

    python bench/serve_memory.py --model smollm2-135m          # ~6 min on 2 cores
    python bench/serve_memory.py --run-dir runs/smollm2 --address 127.0.0.1:6420 --port 8330
    python bench/serve_memory.py --model tiny-llama --run-dir runs/tiny
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.serve_memory")


PARTS = ("Pss", "Pss_Anon", "Pss_Shmem", "Pss_File")


def pss_parts(pid: int) -> dict[str, float]:
    """PSS of one process and its anonymous/shared-memory/file parts, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in PARTS:
            out[key] = int(line.split()[1]) / 1024
    if "Pss" not in out:
        raise RuntimeError(f"no Pss line for pid {pid}")
    return out


def weight_file_mib(pid: int) -> tuple[float, float]:
    """``(Rss, Pss)`` in MiB of the process's mappings of ``*.safetensors`` files (a private
    copy's weights). Their PSS is split with every process on the machine that maps the same
    file, including unrelated ones; the Rss counts them whole."""
    rss = pss = 0
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=6)
        if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
            inside = len(head) >= 6 and head[-1].endswith(".safetensors")
        elif inside and line.startswith("Rss:"):
            rss += int(line.split()[1])
        elif inside and line.startswith("Pss:"):
            pss += int(line.split()[1])
    return rss / 1024, pss / 1024


def pss_kib(pid: int) -> int:
    """PSS of one process in KiB."""
    return int(pss_parts(pid)["Pss"] * 1024)


def make_adapters(run_dir: Path, model_name: str) -> Path:
    """One random LoRA adapter (r=8, q/v) + manifest per axis, as training would leave them."""
    import torch
    from peft import LoraConfig, get_peft_model

    from alignx.artifacts import AdapterManifest, ArtifactLayout, write_json_atomic
    from alignx.axes import AXES
    from alignx.config import ModelCfg
    from alignx.data.templates import DEFAULT_TEMPLATE_IDS
    from alignx.modeling import load_base

    layout = ArtifactLayout(run_dir)
    for i, axis in enumerate(AXES):
        if layout.adapter_manifest(axis).is_file():
            continue
        base, _ = load_base(ModelCfg(name=model_name), use_gpu=False)
        torch.manual_seed(i)
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=[
            "q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
        model.save_pretrained(layout.adapter_dir(axis))
        write_json_atomic(layout.adapter_manifest(axis), AdapterManifest(
            name=axis.value, axes=[axis], base_model=model_name,
            template_ids={axis.value: DEFAULT_TEMPLATE_IDS[axis]}, data_hash="bench",
            lora={"rank": 8}, zero_stage=2, num_workers=1, steps=0, train_tokens=0,
            train_loss=None, tokens_per_s=None, train_seconds=0.0, config_hash="bench"))
    return layout.root


def _alive_actors() -> list:
    """ALIVE actors of the cluster this driver is connected to (an explicit address: with
    another Ray running on the machine, discovery could pick that one)."""
    import ray
    from ray.util.state import list_actors

    return list_actors(address=ray.get_runtime_context().gcs_address,
                       filters=[("state", "=", "ALIVE")], limit=1000)


def replica_pids(app: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for a in _alive_actors():
        if a.class_name.startswith(f"ServeReplica:{app}:expert-"):
            out.setdefault(a.class_name.rsplit(":", 1)[1], []).append(a.pid)
    return out


def stores() -> dict[int, str]:
    """``{pid: actor name}`` of the base-weights store actors."""
    return {a.pid: a.name for a in _alive_actors() if a.class_name == "BaseWeightsStore"}


def scenario(name: str, run_dir: Path, model: str, share: bool, axes: list[str], port: int,
             replica_env: dict[str, str] | None = None, engine: str = "torch") -> dict:
    import httpx
    import ray
    from ray import serve

    from alignx.serve.app import build_app

    args = {"run_dir": str(run_dir), "model": model, "axes": axes, "share_base_weights": share,
            "default_max_tokens": 8, "routing_model": None, "fallback": axes[0],
            "engine": engine,
            "expert_options": {"num_replicas": 1, "ray_actor_options": {
                "num_cpus": 0.1, **({"runtime_env": {"env_vars": replica_env}}
                                    if replica_env else {})}},
            "router_options": {"ray_actor_options": {"num_cpus": 0.1}}}
    t0 = time.time()
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    ready = time.time() - t0
    for axis in axes:  # one request each: activations and adapter weights are touched
        r = httpx.post(f"http://127.0.0.1:{port}/{name}/v1/chat/completions", timeout=300, json={
            "model": f"expert-{axis}", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Give me one tip for sleeping well."}]})
        r.raise_for_status()
    time.sleep(1)
    pids = replica_pids(name)
    per = {dep: sum(pss_kib(p) for p in ps) / 1024 for dep, ps in pids.items()}
    parts = {k: sum(pss_parts(p).get(k, 0.0) for ps in pids.values() for p in ps) for k in PARTS}
    wf = [weight_file_mib(p) for ps in pids.values() for p in ps]
    # The replicas' total with each one's mapped weight files counted whole, as if no other
    # process mapped them (what "its own copy" costs); equal to the PSS for shared weights.
    whole = sum(per.values()) + sum(r - q for r, q in wf)
    store = stores()
    store_mb = sum(pss_kib(p) for p in store) / 1024
    serve.delete(name)
    for actor in store.values():  # the detached store outlives the app: remove it
        ray.kill(ray.get_actor(actor, namespace="alignx"))
    return {"scenario": name, "engine": engine, "share": share, "replicas_mib": per, "total_mib": sum(per.values()),
            "parts_mib": parts, "weights_whole_mib": whole,
            "weight_files_rss_pss_mib": wf, "store_actor_mib": store_mb, "ready_s": round(ready, 1),
            "replica_env": replica_env or {}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--run-dir", type=Path, default=None, help="default: adapters made in a tmp dir")
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--address", default=None,
                   help="an existing Ray cluster (ray start --head); default: start a local one")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the expert replicas, e.g. MALLOC_ARENA_MAX=2")
    p.add_argument("--engine", choices=("both", "torch", "numpy"), default="both",
                   help="the experts' generation engine(s) to measure (default: both)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for k, v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                 "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)
    import ray
    from ray import serve

    from alignx.envs import ray_runtime_env_vars

    run_dir = make_adapters(a.run_dir or Path(tempfile.mkdtemp(prefix="alignx-mem-")), a.model)
    env = {**ray_runtime_env_vars(), "PYTHONPATH": str(REPO)}
    if a.address:
        ray.init(address=a.address, runtime_env={"env_vars": env}, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": env}, log_to_driver=False)
    renv = dict(kv.split("=", 1) for kv in a.env)
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    axes3 = ["helpfulness", "harmlessness", "honesty"]
    engines = ["torch", "numpy"] if a.engine == "both" else [a.engine]
    rows = []
    for eng in engines:
        sfx = "" if eng == "torch" else "-np"
        rows += [scenario(f"shared3{sfx}", run_dir, a.model, True, axes3, a.port, renv, eng),
                 scenario(f"private1{sfx}", run_dir, a.model, False, ["honesty"], a.port, renv, eng),
                 scenario(f"private3{sfx}", run_dir, a.model, False, axes3, a.port, renv, eng)]
    if not a.address:
        serve.shutdown()
    ray.shutdown()
    ones = {r["engine"]: r["weights_whole_mib"] for r in rows if r["scenario"].startswith("private1")}
    print(f"\nexpert replica PSS, model {a.model} (MiB). 'x one': against one replica of the same "
          "engine with its own copy, its weight file counted whole ("
          + ", ".join(f"{e} {v:.0f} MiB" for e, v in ones.items()) + "); 'x torch1': replicas "
          "+ store against one private torch replica")
    print(f"{'scenario':<12} {'engine':<6} {'replicas':>9} {'whole':>6} {'x one':>6} {'+store':>7} "
          f"{'x torch1':>8} {'anon':>6} {'shmem':>6} {'file':>6}  per replica")
    for r in rows:
        one = ones[r["engine"]]
        per = ", ".join(f"{k}={v:.0f}" for k, v in sorted(r["replicas_mib"].items()))
        pp = r["parts_mib"]
        whole, store = r["weights_whole_mib"], r["store_actor_mib"]
        r["x_one"], r["x_one_with_store"] = whole / one, (whole + store) / one
        torch1 = f"{(whole + store) / ones['torch']:>8.2f}" if "torch" in ones else f"{'-':>8}"
        print(f"{r['scenario']:<12} {r['engine']:<6} {r['total_mib']:>9.0f} {whole:>6.0f} "
              f"{whole / one:>6.2f} {(whole + store) / one:>7.2f} {torch1} {pp['Pss_Anon']:>6.0f} "
              f"{pp['Pss_Shmem']:>6.0f} {pp['Pss_File']:>6.0f}  {per}")
    if a.out:
        a.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
