"""alignx.serve.lean: the expert replicas' setup hook that keeps unused libraries out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from alignx.serve.app import AppArgs, deployment_options
from alignx.serve.lean import (
    SETUP_HOOK,
    UNUSED_IN_EXPERTS,
    block_modules,
    hook_env_var,
    lean_actor_options,
)

REPO = Path(__file__).resolve().parents[2]


def _hook(opts: dict) -> str | None:
    return opts["ray_actor_options"].get("runtime_env", {}).get("env_vars", {}).get(hook_env_var())


def test_hook_env_var_is_the_one_ray_workers_read():
    from ray._private import ray_constants

    assert hook_env_var() == ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR


def test_block_modules_makes_import_fail_and_find_spec_none(monkeypatch):
    import importlib.util

    monkeypatch.delitem(sys.modules, "alignx_no_such_mod", raising=False)
    assert block_modules(["alignx_no_such_mod", "json"]) == ["alignx_no_such_mod"]  # json loaded
    try:
        assert importlib.util.find_spec("alignx_no_such_mod") is None
        try:
            import alignx_no_such_mod  # noqa: F401
        except ImportError:
            pass
        else:
            raise AssertionError("a blocked module imported")
    finally:
        del sys.modules["alignx_no_such_mod"]


def test_an_expert_process_generates_without_the_blocked_libraries(tmp_path):
    """In a fresh interpreter: the hook, then Serve, transformers, PEFT and a generate call;
    pandas and scipy must stay out and the model must still answer."""
    code = f"""
import sys
from {SETUP_HOOK.rsplit('.', 1)[0]} import {SETUP_HOOK.rsplit('.', 1)[1]} as hook
hook()
import ray.serve, peft, torch
from transformers import LlamaConfig, LlamaForCausalLM
import alignx.serve.app, alignx.serve.expert
m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2))
# min_new_tokens: the random model may emit EOS (id 2) before its third token
out = m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, min_new_tokens=3,
                 do_sample=False)
assert out.shape == (1, 6), out.shape
loaded = [n for n in {list(UNUSED_IN_EXPERTS)!r} if sys.modules.get(n) is not None]
print("LOADED", loaded)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LOADED []" in r.stdout


def test_lean_actor_options_adds_the_hook_without_touching_the_input():
    given = {"num_cpus": 0.2, "runtime_env": {"env_vars": {"A": "1"}}}
    out = lean_actor_options(given)
    assert out["runtime_env"]["env_vars"] == {"A": "1", hook_env_var(): SETUP_HOOK}
    assert given == {"num_cpus": 0.2, "runtime_env": {"env_vars": {"A": "1"}}}
    assert out["num_cpus"] == 0.2


def test_a_user_setup_hook_wins():
    mine = {"runtime_env": {"env_vars": {hook_env_var(): "my.mod.setup"}}}
    assert lean_actor_options(mine)["runtime_env"]["env_vars"][hook_env_var()] == "my.mod.setup"
    field = {"runtime_env": {"worker_process_setup_hook": "my.mod.setup"}}
    assert hook_env_var() not in lean_actor_options(field)["runtime_env"].get("env_vars", {})


def test_expert_and_system_deployments_get_the_hook_and_the_router_not():
    a = AppArgs(run_dir="x", model="tiny-llama", baselines=["base"],
                expert_options={"ray_actor_options": {"num_cpus": 0.5}})
    opts = deployment_options(a)
    for name in ("expert-helpfulness", "expert-harmlessness", "expert-honesty", "system-base"):
        assert _hook(opts[name]) == SETUP_HOOK, name
        assert opts[name]["ray_actor_options"]["num_cpus"] == 0.5
    assert _hook(opts["router"]) is None
    off = deployment_options(AppArgs(run_dir="x", model="tiny-llama", lean_imports=False))
    assert all(_hook(o) is None for o in off.values())


def test_serve_config_experts_carry_the_same_hook():
    """``ray_actor_options`` in serve_config.yaml replace the code's, so the file repeats the
    hook; it must be the one the code sets, on every expert and not on the router."""
    raw = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    deps = {d["name"]: d for d in raw["applications"][0]["deployments"]}
    for name, d in deps.items():
        want = SETUP_HOOK if name.startswith("expert-") else None
        assert _hook(d) == want, name
