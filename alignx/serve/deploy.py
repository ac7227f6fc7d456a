"""Deploy a run's AlignX app on Ray Serve from an experiment config (CLI, pipeline, evaluation).

``serve_config.yaml`` is the declarative path (``serve run`` / ``serve deploy``); this module is
the programmatic one, used by ``alignx serve`` and by the pipeline's deploy + evaluate stage.
Both end in :func:`alignx.serve.app.build_app`, so they serve the same thing. Several runs
(e.g. the four base models of ``alignx evaluate --models``) share one Serve instance, each
under its own application name and route prefix.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alignx.config import AlignXConfig

log = logging.getLogger(__name__)

#: Evaluation systems that are extra deployments of the app (not the routed ``alignx*`` ids).
BASELINE_SYSTEMS = ("base", "multitask", "h3fusion")


def app_args(cfg: AlignXConfig, systems: list[str] | None = None,
             routing: bool = True, engine: str = "torch") -> dict[str, Any]:
    """``build_app`` arguments for a run: its adapters, router settings and baselines.

    Args:
        cfg: the run config (``run_dir``, ``router.*``).
        systems: evaluation systems to serve; baselines among them become extra deployments.
        routing: serve the calibrated router (``alignx``); False serves only the experts.
        engine: ``AppArgs.engine``. The evaluation keeps ``torch`` for every system: it
            compares the systems' latency and memory, and h3fusion runs on torch only.
    """
    from alignx.storage import run_location

    args: dict[str, Any] = {
        # with shared storage every replica's node fetches the run from there
        "run_dir": run_location(cfg) or str(Path(cfg.run_dir).resolve()),
        "config": str(Path(cfg.run_dir).resolve() / "config.yaml"),
        "encoder": cfg.router.encoder,
        "policy": cfg.router.policy,
        "threshold": cfg.router.threshold,
        "fallback": cfg.router.fallback.value,
        "miss_cost": {a.value: c for a, c in cfg.router.miss_cost.items()},
        "context_turns": cfg.router.context_turns,
        "engine": engine,
    }
    if not routing:
        args["routing_model"] = None
    baselines = [s for s in (systems or []) if s in BASELINE_SYSTEMS]
    if baselines:
        args["baselines"] = baselines
    return args


def app_url(host: str, port: int, route_prefix: str) -> str:
    """Base URL of an app (``http://host:port/prefix``, no trailing slash)."""
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def deploy(cfg: AlignXConfig, systems: list[str] | None = None, *, host: str = "127.0.0.1",
           port: int | None = None, name: str | None = None, route_prefix: str | None = None,
           routing: bool = True, ready_timeout_s: float = 600.0) -> str:
    """Deploy the run's app (blocking until its deployments are healthy) and return its URL.

    Args:
        cfg: the run config (``eval.serve_port``/``app_name``/``route_prefix`` are defaults).
        systems: evaluation systems to include (baselines become deployments).
        host / port: the Serve HTTP proxy (shared by every app on the cluster).
        name / route_prefix: the application's name and prefix.
        routing: include the calibrated router.
        ready_timeout_s: how long to wait for the app to answer ``/healthz``.

    Raises:
        ArtifactNotFoundError: an adapter or the router is missing (before anything starts).
        TimeoutError: the app did not become healthy in time.
    """
    import requests
    from ray import serve

    from alignx.serve.app import build_app
    from alignx.train.trainer import ensure_ray

    port = port or cfg.eval.serve_port
    name = name or cfg.eval.app_name
    prefix = route_prefix or cfg.eval.route_prefix
    app = build_app(app_args(cfg, systems, routing))
    ensure_ray()
    start_serve(host, port)
    host, port = _actual_http(host, port)  # a running Serve instance keeps its own proxy port
    log.info("deploying %s at %s (systems %s)", name, app_url(host, port, prefix), systems)
    serve.run(app, name=name, route_prefix=prefix, blocking=False)
    url = app_url(host, port, prefix)
    deadline = time.monotonic() + ready_timeout_s
    while True:  # serve.run returns when replicas are up; the proxy may need a moment more
        try:
            if requests.get(f"{url}/healthz", timeout=10).status_code == 200:
                return url
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"app {name!r} at {url} did not answer /healthz within "
                               f"{ready_timeout_s:.0f}s; see `serve status`")
        time.sleep(1.0)


def start_serve(host: str, port: int, attempts: int = 5) -> None:
    """Start Serve's controller and proxy, or connect to the running ones.

    Several drivers (the pipelines of ``alignx evaluate --models``) may start Serve at the
    same moment; the loser of that race sees ``ActorAlreadyExistsError`` and simply connects
    on the next attempt.
    """
    from ray import serve
    from ray.exceptions import ActorAlreadyExistsError

    for attempt in range(attempts):
        try:
            serve.start(http_options={"host": host, "port": port})
            return
        except ActorAlreadyExistsError:
            if attempt == attempts - 1:
                raise
            time.sleep(2.0)


def _actual_http(host: str, port: int) -> tuple[str, int]:
    """The proxy's real host/port: ``serve.start`` on a running instance does not move it."""
    try:
        from ray.serve.context import _get_global_client  # no public getter in Ray 2.60

        cfg = _get_global_client().http_config
    except Exception:  # noqa: BLE001 - best effort: fall back to what was asked for
        return host, port
    if cfg.port != port:
        log.warning("Serve is already running with HTTP on port %s (asked for %s); using it",
                    cfg.port, port)
    return (host if cfg.host in ("0.0.0.0", None) else cfg.host), cfg.port


def undeploy(name: str) -> None:
    """Delete one application (other apps on the Serve instance keep running)."""
    from ray import serve

    serve.delete(name, _blocking=True)
