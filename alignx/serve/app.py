"""Serving: build the Ray Serve application (the only module that imports ``ray.serve``).

``serve run serve_config.yaml`` (or ``serve deploy``) calls :func:`build_app` with the
``args:`` of that file, validated as :class:`AppArgs`. It makes one deployment per axis,
``expert-<axis>`` (:class:`~alignx.serve.expert.AxisExpert` with ``@serve.batch`` applied
here), one per enabled baseline, ``system-<name>`` (``AppArgs.baselines``: ``base``,
``multitask``, ``h3fusion``, served by :class:`~alignx.serve.expert.SystemGenerator` from the
same loader the evaluation scores with), and the ingress ``router``
(:class:`~alignx.serve.router.AlignXRouter` behind its FastAPI app) bound with the expert and
system handles. Deployment options given here are defaults; the
``deployments:`` section of the Serve config overrides them (replicas, autoscaling, CPUs).

Serve another run directory without editing the file::

    serve run alignx.serve.app:build_app run_dir=runs/smollm2 config=jobs/configs/smollm2_cpu.yaml \
        routing_model=mypkg.routing:load

or set ``user_config: {run_dir: ...}`` on the expert deployments and ``serve deploy`` again:
the experts swap adapters in place without dropping in-flight requests.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alignx.axes import Axis
from alignx.baselines.systems import SYSTEM_PREFIX
from alignx.serve.expert import AxisExpert, SystemGenerator
from alignx.serve.lean import UNUSED_IN_EXPERTS, lean_actor_options
from alignx.serve.router import AlignXRouter, RouterSettings, build_router_api, load_routing_model

log = logging.getLogger(__name__)

ROUTER_NAME = "router"

#: Defaults sized for a 2-core laptop; ``serve_config.yaml`` ``deployments:`` overrides them.
DEFAULT_EXPERT_OPTIONS: dict[str, Any] = {
    "ray_actor_options": {"num_cpus": 0.2},
    "max_ongoing_requests": 16,
    "max_queued_requests": 64,
    "health_check_period_s": 5.0,
    "health_check_timeout_s": 30.0,
}
DEFAULT_ROUTER_OPTIONS: dict[str, Any] = {
    "ray_actor_options": {"num_cpus": 0.1},
    "max_ongoing_requests": 64,
    "max_queued_requests": 256,
}


class AppArgs(BaseModel):
    """Arguments of :func:`build_app` (the ``args:`` of ``serve_config.yaml``).

    The base model comes from ``config`` (an experiment YAML, its ``model`` section and
    ``axes``) or, without one, from ``model`` (a registry name). Fields the lead may later move
    into ``AlignXConfig.serve``: everything except ``run_dir``/``config``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_dir: str = Field(description="Run directory with adapters/<axis> (and the router), or "
                         "the run's URI on shared storage (s3://bucket/prefix/<run>, ...).")
    config: str | None = Field(None, description="Experiment YAML; its model/axes are used.")
    model: str | None = Field(None, description="Base model name when no config is given.")
    axes: list[Axis] | None = Field(None, description="Axes to serve; default: config axes.")
    encoder: Literal["sentence", "base"] = Field("sentence", description="Router features h(x).")
    routing_model: str | None = Field(
        "alignx.router.serving:load",
        description="'module:function' loading the routing model from the run dir (default: the "
                    "calibrated MoCaE router of `alignx calibrate`); null serves only expert-<axis>.")
    policy: Literal["top1", "threshold", "cost"] = "top1"
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    fallback: Axis = Axis.HARMLESSNESS
    miss_cost: dict[Axis, float] = Field(
        default_factory=dict, description="policy=cost: cost of sending a request whose right "
        "expert is this axis elsewhere (axes not named: 1); see router.miss_cost.")
    context_turns: int = Field(0, ge=0, description="Earlier turns the router reads.")
    max_prompt_tokens: int = Field(2048, ge=1, description="Longer prompts get a 400.")
    default_max_tokens: int = Field(128, ge=1)
    max_tokens_limit: int = Field(1024, ge=1, description="Larger max_tokens gets a 400.")
    auth_env: str | None = Field(None, description="Env var holding the bearer API key.")
    log_prompts: bool = Field(False, description="Put the messages into the request log line.")
    baselines: list[Literal["base", "multitask", "h3fusion"]] = Field(
        default_factory=list,
        description="Baseline systems to serve as extra model ids (deployments system-<name>, "
                    "with expert_options); alignx-softmax comes with the routing model.")
    max_batch_size: int = Field(8, ge=1, description="@serve.batch size per expert replica.")
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    share_base_weights: bool = Field(
        True, description="Replicas on a node share one object-store copy of the base weights.")
    torch_threads: int | None = Field(
        1, ge=1, description="Compute threads per generating replica (torch, or BLAS for the "
                             "numpy engine).")
    engine: Literal["auto", "numpy", "torch"] = Field(
        "auto", description="Generation engine of the experts and the base/multitask systems: "
        "numpy (torch-free, CPU: ~1/3 of a torch replica's memory, alignx.serve.npengine), "
        "torch (transformers generate; CPU or GPU), or auto (numpy on a CPU replica when the "
        "model and adapter are supported, else torch). h3fusion always runs on torch.")
    lean_imports: bool = Field(
        True, description="Expert replicas skip libraries they never use (pandas, scipy, "
                          "boto3): ~60 MiB less per replica (alignx.serve.lean).")
    expert_options: dict[str, Any] = Field(
        default_factory=dict, description="Serve deployment options for every expert.")
    router_options: dict[str, Any] = Field(
        default_factory=dict, description="Serve deployment options for the router.")

    @model_validator(mode="after")
    def _check(self) -> AppArgs:
        if self.config is None and self.model is None:
            raise ValueError("give config (an experiment YAML) or model (a base model name)")
        if len(set(self.baselines)) != len(self.baselines):
            raise ValueError(f"baselines has duplicates: {self.baselines}")
        return self

    def model_cfg(self) -> dict[str, Any]:
        """The base model section (from ``config``, with ``model`` overriding the name)."""
        if self.config is not None:
            from alignx.config import load_config

            d = load_config(self.config).model.model_dump()
        else:
            d = {}
        if self.model is not None:
            d["name"] = self.model
        return d

    def served_axes(self) -> list[Axis]:
        if self.axes is not None:
            return list(self.axes)
        if self.config is not None:
            from alignx.config import load_config

            return list(load_config(self.config).axes)
        from alignx.axes import AXES

        return list(AXES)

    def check_fallback(self) -> None:
        """Refuse a ``threshold`` or ``cost`` policy whose fallback axis has no expert in this
        app, and ``cost`` with a miss cost that is not a positive number of a served axis.

        Raises:
            ValueError: names ``fallback`` (or ``miss_cost``), the served axes and the fix.
        """
        if self.policy == "top1" or self.routing_model is None:
            return
        served = self.served_axes()
        if self.fallback not in served:
            who = "unsure" if self.policy == "threshold" else "out-of-distribution"
            raise ValueError(
                f"fallback={self.fallback.value!r} is not a served axis "
                f"{[x.value for x in served]}: with policy {self.policy!r} {who} requests go to "
                "the fallback expert, so set fallback to one of the served axes or add its axis")
        if self.policy == "cost":
            from alignx.router.mocae import miss_cost_vector

            miss_cost_vector(self.miss_cost, served)

    def router_settings(self) -> RouterSettings:
        """Ingress settings; resolves the API key from ``auth_env``.

        Raises:
            ValueError: ``auth_env`` is set but the variable is empty or missing.
        """
        key = None
        if self.auth_env:
            key = os.environ.get(self.auth_env)
            if not key:
                raise ValueError(f"auth_env={self.auth_env!r} but that variable is not set "
                                 "in the router's environment (runtime_env.env_vars)")
        return RouterSettings(
            policy=self.policy, threshold=self.threshold, fallback=self.fallback,
            miss_cost=self.miss_cost,
            context_turns=self.context_turns, max_prompt_tokens=self.max_prompt_tokens,
            default_max_tokens=self.default_max_tokens, max_tokens_limit=self.max_tokens_limit,
            api_key=key, log_prompts=self.log_prompts)


def choose_engine(engine: str, target: str, model_cfg: Any) -> tuple[str, str]:
    """The generation engine of one replica and why (``AppArgs.engine``; pure but for the GPU
    check, which asks Ray).

    Args:
        engine: ``auto``, ``numpy`` or ``torch``.
        target: the axis or system name the replica serves.
        model_cfg: the base model section (``ModelCfg``).

    Returns:
        ``("numpy" | "torch", reason)``.

    Raises:
        UnsupportedModelError: ``engine: numpy`` for a model or system it cannot run.
    """
    from alignx.modeling import resolve_model_dir
    from alignx.serve.npengine import UnsupportedModelError, numpy_supported

    if engine == "torch":
        return "torch", "engine: torch"
    reason = None
    if target == "h3fusion":
        reason = "h3fusion's token-level gates are torch modules"
    elif _has_gpu():
        reason = "a GPU is assigned to this replica"
    else:
        reason = numpy_supported(resolve_model_dir(model_cfg.name))
    if reason is None:
        return "numpy", f"engine: {engine}, CPU, {model_cfg.name} supported"
    if engine == "numpy":
        raise UnsupportedModelError(f"engine: numpy cannot serve {target!r}: {reason}; "
                                    "use engine: torch or auto")
    return "torch", f"engine: auto, {reason}"


def _has_gpu() -> bool:
    try:
        import ray

        return ray.is_initialized() and bool(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - outside a Ray worker: no GPU was assigned by Ray
        return False


def _merge(defaults: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = {**defaults, **over}
    if "ray_actor_options" in defaults and "ray_actor_options" in over:
        out["ray_actor_options"] = {**defaults["ray_actor_options"], **over["ray_actor_options"]}
    if "autoscaling_config" in out:
        out.pop("num_replicas", None)
    return out


def deployment_options(args: AppArgs) -> dict[str, dict[str, Any]]:
    """Resolved Serve options per deployment name (pure; unit-tested without Ray)."""
    expert = _merge(DEFAULT_EXPERT_OPTIONS, args.expert_options)
    if args.lean_imports:
        expert["ray_actor_options"] = lean_actor_options(expert["ray_actor_options"])
    opts = {f"expert-{a.value}": copy.deepcopy(expert) for a in args.served_axes()}
    for name in args.baselines:
        opts[f"{SYSTEM_PREFIX}{name}"] = copy.deepcopy(expert)
    opts[ROUTER_NAME] = _merge(DEFAULT_ROUTER_OPTIONS, args.router_options)
    return opts


# ----------------------------------------------------------------------------- Serve shells
# Thin subclasses that add what only Serve provides (batching, metrics, the ASGI hook); the
# logic stays in the plain classes.


def _serve_classes() -> tuple[type, type, type]:
    from ray import serve
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve.exceptions import BackPressureError
    from ray.serve.metrics import Counter, Histogram

    class _Batched:
        """What a generating replica adds under Serve: shared base weights and batching.

        ``target`` is the axis (:class:`AxisExpert`) or the system name
        (:class:`SystemGenerator`); both take the same arguments after it.
        """

        def __init__(self, target: str, args: dict[str, Any]):
            a = AppArgs.model_validate(args)
            loaded = [n for n in UNUSED_IN_EXPERTS if sys.modules.get(n) is not None]
            if a.lean_imports and loaded:
                log.warning("lean_imports is on but %s are loaded in this replica: its "
                            "ray_actor_options replaced the worker setup hook (see the "
                            "deployments of serve_config.yaml)", loaded)
            from alignx.config import ModelCfg
            from alignx.serve.npengine import UnsupportedModelError, limit_threads
            from alignx.serve.weights import numpy_base_loader, shared_base_loader

            mcfg = ModelCfg(**a.model_cfg())
            engine, why = choose_engine(a.engine, target, mcfg)
            log.info("%s: %s engine (%s)", target, engine, why)
            torch_loader = shared_base_loader(mcfg) if a.share_base_weights else None
            init = (target, a.run_dir, a.model_cfg(), a.max_prompt_tokens)
            if engine == "numpy":
                if a.torch_threads:
                    limit_threads(a.torch_threads)
                try:
                    super().__init__(*init, numpy_base_loader(mcfg, a.share_base_weights))
                except UnsupportedModelError as e:
                    if a.engine == "numpy":
                        raise
                    log.warning("%s: the numpy engine cannot serve it (%s); using torch",
                                target, e)
                    engine = "torch"
            if engine == "torch":
                super().__init__(*init, torch_loader,  # type: ignore[call-arg]
                                 torch_threads=a.torch_threads)
            self._submit.set_max_batch_size(a.max_batch_size)
            self._submit.set_batch_wait_timeout_s(a.batch_wait_timeout_s)
            self.max_batch_size = a.max_batch_size  # generate_batch merges queued batches

        # Batches that form while the model is busy must reach generate_batch to be merged, so
        # they are not capped here (Serve may warn that batch size x batches > max_ongoing).
        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=1024)
        async def _submit(self, requests: list[Any]) -> list[Any]:
            return await self.generate_batch(requests)  # type: ignore[attr-defined]

    class ServedExpert(_Batched, AxisExpert):
        pass

    class ServedSystem(_Batched, SystemGenerator):
        pass

    ms_buckets = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]

    class RayRouterMetrics:
        def __init__(self) -> None:
            self.requests = Counter("alignx_routed_requests", "Requests per expert axis.",
                                    tag_keys=("axis", "routed", "status"))
            self.ood = Counter("alignx_ood_requests", "Requests flagged out of distribution.",
                               tag_keys=("axis",))
            self.confidence = Histogram(
                "alignx_routing_confidence", "Routing confidence max p_hat.",
                boundaries=[0.1 * i for i in range(1, 10)] + [0.95, 0.99], tag_keys=("axis",))
            self.route_ms = Histogram("alignx_route_latency_ms", "Routing time (features + "
                                      "router + policy).", boundaries=ms_buckets, tag_keys=("axis",))
            self.expert_ms = Histogram("alignx_expert_latency_ms", "Expert time (queue + "
                                       "generation).", boundaries=ms_buckets, tag_keys=("axis",))

        def record(self, *, axis: str, routed: bool, confidence: float | None, ood: bool | None,
                   route_ms: float, expert_ms: float, status: int) -> None:
            tags = {"axis": axis}
            self.requests.inc(1, tags={**tags, "routed": str(routed).lower(), "status": str(status)})
            if routed:
                self.route_ms.observe(route_ms, tags=tags)
                if confidence is not None:
                    self.confidence.observe(confidence, tags=tags)
                if ood:
                    self.ood.inc(1, tags=tags)
            self.expert_ms.observe(expert_ms, tags=tags)

    class RouterIngress(AlignXRouter):
        def __init__(self, experts: dict[str, Any], args: dict[str, Any],
                     systems: dict[str, Any] | None = None):
            a = AppArgs.model_validate(args)
            from alignx.artifacts import check_same_base
            from alignx.config import ModelCfg
            from alignx.modeling import load_tokenizer
            from alignx.router.features import build_encoder

            if a.torch_threads:
                import torch

                torch.set_num_threads(a.torch_threads)
            mcfg = ModelCfg(**a.model_cfg())
            routing = encoder = None
            if a.routing_model:
                routing = load_routing_model(a.run_dir, a.routing_model)
                made_for = getattr(routing, "base_model", None)
                if made_for is not None:  # a router's features/experts must share the base model
                    check_same_base(mcfg.name, made_for, "the calibrated router")
                # a calibrated router may carry fine-tuned encoder weights: serve with them
                encoder = build_encoder(a.encoder, mcfg, getattr(routing, "encoder_weights", None))
            super().__init__(experts, routing, encoder, a.router_settings(),
                             tokenizer=load_tokenizer(mcfg), metrics=RayRouterMetrics(),
                             overload_errors=(BackPressureError,), systems=systems,
                             unavailable_errors=(ActorDiedError, ActorUnavailableError))

        def __serve_build_asgi_app__(self):  # noqa: ANN204 - Serve's late-bound ingress hook
            return build_router_api(self)

    return ServedExpert, ServedSystem, RouterIngress


def build_app(args: dict[str, Any] | AppArgs) -> Any:
    """Build the AlignX Serve application: ``expert-<axis>`` per axis, ``system-<name>`` per
    enabled baseline, and the ``router`` ingress.

    Args:
        args: :class:`AppArgs` or its dict (the ``args:`` of ``serve_config.yaml``).

    Returns:
        A ``ray.serve.Application`` for ``serve.run`` / ``serve deploy``.

    Raises:
        pydantic.ValidationError: bad args (names the field).
        ValueError: a ``threshold`` fallback axis that is not served.
        ArtifactNotFoundError: an axis has no adapter in ``run_dir``, or an enabled baseline
            has no artifact (checked before deploying).
    """
    from ray import serve

    from alignx.artifacts import ArtifactLayout
    from alignx.storage import localize

    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    a.check_fallback()
    layout = ArtifactLayout(localize(a.run_dir, *(f"adapters/{x.value}" for x in a.served_axes())))
    for axis in a.served_axes():  # fail on the driver, not in a replica restart loop
        layout.load_adapter_manifest(axis)
    _check_baselines(a)
    served_expert, served_system, router_ingress = _serve_classes()
    opts = deployment_options(a)
    log.info("alignx serve: run_dir=%s axes=%s options=%s", layout.root,
             [x.value for x in a.served_axes()], opts)
    wire = a.model_dump(mode="json")
    experts = {
        axis.value: serve.deployment(served_expert, name=f"expert-{axis.value}",
                                     **opts[f"expert-{axis.value}"]).bind(axis.value, wire)
        for axis in a.served_axes()
    }
    systems = {
        name: serve.deployment(served_system, name=f"{SYSTEM_PREFIX}{name}",
                               **opts[f"{SYSTEM_PREFIX}{name}"]).bind(name, wire)
        for name in a.baselines
    }
    ingress = serve.deployment(serve.ingress()(router_ingress), name=ROUTER_NAME,
                               **opts[ROUTER_NAME])
    return ingress.bind(experts, wire, systems)


def _check_baselines(a: AppArgs) -> None:
    """Fail on the driver when an enabled baseline has no artifact (names how to make it)."""
    from alignx.artifacts import MULTITASK, ArtifactLayout
    from alignx.storage import localize

    if MULTITASK in a.baselines:
        ArtifactLayout(localize(a.run_dir, f"adapters/{MULTITASK}")).load_adapter_manifest(
            MULTITASK)
    if "h3fusion" in a.baselines:
        from alignx.baselines.h3fusion import NAME, load_h3fusion_manifest

        load_h3fusion_manifest(localize(a.run_dir, f"baselines/{NAME}"))
