"""Lean expert replicas: keep libraries the generation path never uses out of the process.

Every expert replica is a process of its own, so whatever it imports is paid once per replica
on the node. Three large libraries arrive only as *optional* imports of code an expert never
runs:

* ``pandas`` (~33 MiB of heap): ``ray.serve`` registers a JSON encoder for DataFrames if it
  can import it (``try: import pandas`` in ``ray/serve/_private/utils.py``);
* ``scipy`` (~22 MiB): transformers' object-detection losses (``loss_for_object_detection``)
  import it when ``is_scipy_available()``;
* ``boto3``/``botocore`` (~7 MiB): accelerate (imported by PEFT) loads its SageMaker config
  helpers when ``is_boto3_available()``. AlignX reads remote run directories with
  ``pyarrow.fs``, not boto3.

All these callers check availability first (``ImportError`` or ``importlib.util.find_spec``),
so a replica that marks them as absent (``sys.modules[name] = None``, which makes
``import name`` raise ``ImportError`` and ``find_spec`` return ``None``) runs the same code
without them.
Measured in a plain interpreter with SmolLM2-135M: 365 -> 304 MiB of anonymous memory after
the imports of an expert replica (see ``bench/serve_memory.py`` and BENCHMARKS.md).

The blocking has to happen before ``ray.serve`` is imported, which is before any of our code
runs in a replica (unpickling the deployment class imports Serve). Ray's worker process setup
hook is the place: :func:`lean_actor_options` adds it to an expert deployment's
``ray_actor_options``.

``torch._dynamo`` (~67 MiB with sympy) would be the next candidate, but transformers 5 reaches
it at import time from many places (``masking_utils``, ``@torch.compiler.disable`` and
``@torch._dynamo.assume_constant_result`` decorators, ``torch.distributed.tensor``); a deferred
stand-in for it was tried and broke on circular imports inside torch, so it is left alone.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable
from typing import Any

#: Imported only optionally by the libraries an expert replica uses; never used when serving.
UNUSED_IN_EXPERTS: tuple[str, ...] = ("pandas", "scipy", "boto3", "botocore")

#: ``module.function`` Ray runs in a new worker process before any actor code.
SETUP_HOOK = "alignx.serve.lean.setup_expert_process"

# Ray turns ``runtime_env={"worker_process_setup_hook": ...}`` into this variable only for the
# job-level runtime_env (``ray.init``); for one actor's runtime_env the variable itself is what
# the worker reads (ray/_private/workers/default_worker.py).
_HOOK_ENV_FALLBACK = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"


def block_modules(names: Iterable[str]) -> list[str]:
    """Mark modules as absent in this process, so optional imports of them skip.

    A module already imported is left alone (blocking it then would break its users).

    Args:
        names: top-level module names.

    Returns:
        The names that were blocked now.
    """
    blocked = []
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]
            blocked.append(name)
    return blocked


def setup_expert_process() -> None:
    """Ray worker process setup hook of expert replicas: block :data:`UNUSED_IN_EXPERTS`."""
    block_modules(UNUSED_IN_EXPERTS)


def hook_env_var() -> str:
    """The environment variable through which a Ray worker finds its setup hook."""
    try:
        from ray._private import ray_constants

        return str(ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR)
    except (ImportError, AttributeError):  # a Ray without the constant: the known name
        return _HOOK_ENV_FALLBACK


def lean_actor_options(ray_actor_options: dict[str, Any]) -> dict[str, Any]:
    """``ray_actor_options`` with :func:`setup_expert_process` as the worker setup hook.

    Options that already name a setup hook are left alone, and the replica then imports
    everything. That holds for the variable, which Ray runs, and for the
    ``runtime_env.worker_process_setup_hook`` field, which Ray only applies to a job-level
    runtime_env: the field is taken as the user's intent either way.

    Args:
        ray_actor_options: a deployment's actor options (not modified).

    Returns:
        A new dict.
    """
    out = copy.deepcopy(ray_actor_options)
    renv = out.setdefault("runtime_env", {})
    env = renv.setdefault("env_vars", {})
    var = hook_env_var()
    if renv.get("worker_process_setup_hook") is None and var not in env:
        env[var] = SETUP_HOOK
    return out
