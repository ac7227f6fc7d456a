"""``alignx evaluate``: deploy (or attach to) the Serve app, evaluate every system, report.

:func:`evaluate` is one run (one base model); :func:`evaluate_models` runs one whole pipeline
per base model concurrently (the paper's four-LLM experiment) and merges their reports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignx.artifacts import ArtifactLayout, read_json, write_json_atomic, write_text_atomic
from alignx.axes import Axis

if TYPE_CHECKING:
    from alignx.config import AlignXConfig

log = logging.getLogger(__name__)


def eval_dir(cfg: AlignXConfig) -> Path:
    return ArtifactLayout(cfg.run_dir).root / "eval"


def report_path(cfg: AlignXConfig) -> Path:
    return eval_dir(cfg) / "report.json"


def eval_manifest_path(cfg: AlignXConfig) -> Path:
    """``<run_dir>/eval/manifest.json``: written last, it marks the evaluation as finished and
    makes ``eval/`` one artifact on shared storage (published and fetched whole)."""
    from alignx.storage import MANIFEST

    return eval_dir(cfg) / MANIFEST


def _generation_settings(cfg: AlignXConfig) -> dict[str, Any]:
    """What an answer depends on besides the prompt and system: reuse answers only if equal."""
    d = cfg.model_dump(mode="json")
    return {"max_tokens": cfg.eval.max_tokens, "temperature": cfg.eval.temperature,
            "train": cfg.stage_hash("train"), "calibrate": cfg.stage_hash("calibrate"),
            "baselines": d.get("baselines"), "model": cfg.model.name}


def default_scorer_loader(cfg: AlignXConfig) -> Callable[[str], tuple[Any, Any, str | None]]:
    """MC scoring models: the same loader the Serve deployments generate with."""
    from alignx.baselines.systems import load_system

    def load(name: str) -> tuple[Any, Any, str | None]:
        s = load_system(name, cfg.run_dir, cfg.model)
        return s.model, s.tokenizer, s.system

    return load


def _judges_validity(cfg: AlignXConfig, judges: Any) -> dict[str, Any] | None:
    from alignx import envs
    from alignx.eval.judge_validation import validate_judges

    kinds = {a: (cfg.eval.judges.get(a) or {}).get("kind", "offline")
             for a in ("harmlessness", "honesty")}
    if not cfg.eval.validate_judges or set(kinds.values()) & {"openai", "fake"}:
        return None
    data = Path(cfg.data.data_dir) if cfg.data.data_dir else envs.data_dir()
    if data is None:
        return None
    try:
        return validate_judges(judges.harmlessness, judges.honesty, data, "test")
    except (FileNotFoundError, ValueError) as e:  # small fixture data: no validity figures
        log.warning("judge validation skipped: %s", e)
        return {"skipped": str(e)}


def evaluate(
    cfg: AlignXConfig,
    url: str | None = None,
    *,
    api_key: str | None = None,
    scorer_loader: Callable[[str], tuple[Any, Any, str | None]] | None = None,
    cost_fn: Callable[..., dict[str, Any]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate every ``cfg.eval.systems`` system on the test prompts and write the report.

    Args:
        cfg: the run config (a finished run: adapters, router, baselines).
        url: an already running app (``http://host:port[/prefix]``); None deploys the run's
            app on Serve for the evaluation (and deletes it afterwards unless
            ``eval.keep_serving``).
        api_key: bearer key of an app with auth.
        scorer_loader: MC scoring models (default: :func:`default_scorer_loader`).
        cost_fn: latency/memory measurement (default: ``alignx.baselines.cost.measure_costs``).
        progress: progress bars.

    Returns:
        The report dict (also written to ``<run_dir>/eval/report.json`` with ``report.md`` and
        PNG plots).

    Raises:
        ValueError: the app does not serve a configured system (names it and the fix).
        RuntimeError: requests failed after retries (answers so far are kept; rerun resumes).
    """
    from alignx import envs
    from alignx.eval.harness import (
        GenerationStore,
        ServeClient,
        generate_all,
        load_eval_prompts,
        score_systems,
        stored_generations,
    )
    from alignx.eval.judges import build_judges
    from alignx.eval.report import markdown_table, write_report

    t0 = time.time()
    out_dir = eval_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_manifest_path(cfg).unlink(missing_ok=True)  # eval/ reads as unfinished until the end
    ArtifactLayout(cfg.run_dir).save_config(cfg, "eval/config.yaml")
    systems = list(cfg.eval.systems)
    prompts = load_eval_prompts(cfg)
    data_dir = Path(cfg.data.data_dir) if cfg.data.data_dir else envs.data_dir()
    judges = build_judges(cfg.eval.judges, data_dir=data_dir,
                          cache_path=out_dir / "judge_cache.jsonl")
    store = GenerationStore(out_dir / "generations.jsonl")
    settings = _generation_settings(cfg)
    deployed = None
    via = url
    if url is None and not stored_generations(store, systems, prompts, settings)[1]:
        # every answer is stored (a rescoring: new judges, bootstrap, MC): no app to deploy
        try:
            via = read_json(report_path(cfg))["generation"]["via"]
        except (OSError, ValueError, KeyError, TypeError):  # no (readable) earlier report
            via = "an earlier deployment"
        log.info("every answer is stored (%s); scoring them without deploying the app", via)
        gens = generate_all(None, store, systems, prompts, settings, cfg.eval.concurrency,
                            progress)
    else:
        if url is None:
            from alignx.serve.deploy import deploy

            via = url = deploy(cfg, systems)
            deployed = cfg.eval.app_name
        try:
            client = ServeClient(url, api_key, cfg.eval.request_timeout_s)
            served = set(client.models())
            missing = [s for s in systems if s not in served]
            if missing:
                raise ValueError(f"the app at {url} does not serve {missing} (it serves "
                                 f"{sorted(served)}); drop them from eval.systems or deploy "
                                 "them")
            gens = generate_all(client, store, systems, prompts, settings,
                                cfg.eval.concurrency, progress)
        finally:
            if deployed and not cfg.eval.keep_serving:
                from alignx.serve.deploy import undeploy

                undeploy(deployed)
    mc = None
    if cfg.eval.mc and Axis.HONESTY in prompts:
        from alignx.eval.mc import MCCache, mc_scores

        qs = prompts[Axis.HONESTY][: cfg.eval.mc_questions or None]
        mc_settings = {k: v for k, v in settings.items()
                       if k not in ("max_tokens", "temperature", "calibrate")}  # scorers' inputs
        mc = mc_scores(systems, qs, gens, scorer_loader or default_scorer_loader(cfg), progress,
                       cache=MCCache(out_dir / "mc_cache.jsonl", mc_settings))
    rows = score_systems(cfg, judges, prompts, gens, mc)
    judge_ids = judges.ids()
    report: dict[str, Any] = {
        "model": cfg.model.name,
        "run_dir": str(ArtifactLayout(cfg.run_dir).root),
        "config_hash": cfg.stage_hash("evaluate"),
        "prompts_per_axis": {a.value: len(p) for a, p in prompts.items()},
        "generation": {"max_tokens": cfg.eval.max_tokens, "temperature": cfg.eval.temperature,
                       "via": via},
        "judges": judge_ids,
        "fake_judges": [a for a, j in judge_ids.items() if j.startswith("fake")],
        "systems": rows,
    }
    report["judge_validity"] = _judges_validity(cfg, judges)
    if cfg.eval.cost:
        if cost_fn is None:
            from alignx.baselines.cost import measure_costs as cost_fn
        flat = [p for ps in prompts.values() for p in ps]
        step = max(1, len(flat) // cfg.eval.cost_prompts)
        report["cost"] = cost_fn(cfg.run_dir, cfg.model, systems,
                                 [list(p.messages) for p in flat[::step][: cfg.eval.cost_prompts]],
                                 max_tokens=cfg.eval.max_tokens)
    report["elapsed_s"] = round(time.time() - t0, 1)
    paths = write_report(report, out_dir)
    _finish_eval_dir(cfg, report)
    print(f"\n{markdown_table(report)}\n\nreport: {paths['json']} ({paths['markdown'].name}, "
          f"plots: {', '.join(p.name for k, p in paths.items() if p.suffix == '.png')})",
          flush=True)
    return report


def _finish_eval_dir(cfg: AlignXConfig, report: dict[str, Any]) -> None:
    """Write ``eval/manifest.json`` (last, atomically) and publish ``eval/`` to shared storage."""
    from alignx.storage import MANIFEST, publish

    out = eval_dir(cfg)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                   if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))
    write_json_atomic(eval_manifest_path(cfg), {
        "stage": "evaluate", "config_hash": report["config_hash"], "model": report["model"],
        "report": report_path(cfg).name, "judges": report["judges"],
        "fake_judges": report["fake_judges"], "files": files})
    publish(cfg, out)


# ----------------------------------------------------------------------------- several models


def model_config(cfg: AlignXConfig, model: str) -> AlignXConfig:
    """The config of one base model's pipeline in a multi-model evaluation: its own run
    directory ``<run_dir>/<model>``, Serve application ``alignx-<model>`` and prefix."""
    from alignx.config import validate_config
    from alignx.models import REGISTRY

    if model not in REGISTRY and "/" not in model:  # a registry name, a Hub id or a path
        raise ValueError(f"--models: unknown model {model!r}; registry names: "
                         f"{', '.join(REGISTRY)} (or a Hub id / local path)")
    d = cfg.model_dump(mode="json")
    d["model"]["name"] = model
    d["run_dir"] = str(Path(cfg.run_dir).resolve() / model.replace("/", "_"))
    d["eval"]["app_name"] = f"alignx-{model.replace('/', '_')}"
    d["eval"]["route_prefix"] = f"/{model.replace('/', '_')}"
    return validate_config(d, f"<{model} pipeline>")


def evaluate_models(cfg: AlignXConfig, models: list[str], force: bool = False,
                    worker_group_timeout_s: float = 1800.0) -> dict[str, Any]:
    """Run the whole pipeline for each base model concurrently and merge the reports.

    Each model's pipeline (prepare -> train -> calibrate -> baselines -> deploy -> evaluate)
    runs in its own Ray actor; the actors ask for no CPU themselves, the Ray Train workers and
    Serve replicas they start ask for what the config gives them, so Ray places and queues the
    four pipelines' work by resources. Each model's app has its own name and route prefix on
    the shared Serve proxy.

    Args:
        cfg: the shared config; each model gets :func:`model_config` of it.
        models: base model names (registry names, Hub ids or paths).
        force: redo finished stages.
        worker_group_timeout_s: how long a training worker group may wait for resources.

    Returns:
        The comparison (also ``<run_dir>/comparison.json``, ``comparison.md`` and
        ``comparison.png``).

    Raises:
        ValueError: an unknown model name or an empty list.
        RuntimeError: a model's pipeline failed (the others' results are still merged and
            written; the message names the failed models).
    """
    import ray

    from alignx.train.trainer import ensure_ray

    if not models:
        raise ValueError("--models needs at least one registry name (see `alignx models`)")
    cfgs = {m: model_config(cfg, m) for m in models}
    ensure_ray()
    from alignx.serve.deploy import start_serve

    start_serve("127.0.0.1", cfg.eval.serve_port)  # once, before the pipelines race to it

    @ray.remote(num_cpus=0)
    class PipelineRunner:
        def run(self, c: AlignXConfig, force: bool) -> str:
            from alignx import envs
            from alignx.pipeline import run_pipeline

            envs.setup_logging()
            run_pipeline(c, force=force)
            return str(report_path(c))

    # The pipelines' Ray Train worker groups queue for the same CPUs/GPUs: let them wait for
    # resources longer than Ray Train's default 60 s instead of failing.
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(int(worker_group_timeout_s))}
    runners = {m: PipelineRunner.options(runtime_env={"env_vars": env}).remote() for m in models}
    refs = {m: runners[m].run.remote(cfgs[m], force) for m in models}
    failed: dict[str, str] = {}
    for m, ref in refs.items():
        try:
            ray.get(ref)
        except Exception as e:  # noqa: BLE001 - one model's failure must not lose the others
            failed[m] = failure_summary(e)
            log.error("pipeline for %s failed: %s", m, e)
    reports = {m: read_json(report_path(c)) for m, c in cfgs.items()
               if m not in failed and report_path(c).is_file()}
    comparison = merge_reports(reports, failed)
    root = Path(cfg.run_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(root / "comparison.md", comparison_markdown(comparison))
    _plot_comparison(comparison, root / "comparison.png")
    write_json_atomic(root / "comparison.json", comparison)
    print("\n" + comparison_markdown(comparison), flush=True)
    if failed:
        raise RuntimeError(f"pipelines failed for {sorted(failed)}: {failed}; the others' "
                           f"results are in {root / 'comparison.md'}")
    return comparison


def failure_summary(e: BaseException) -> str:
    """One line naming what failed: the error raised inside the Ray actor (a ``RayTaskError``'s
    own first line only names the actor and its pid)."""
    cause = getattr(e, "cause", None)
    err = cause if isinstance(cause, BaseException) else e
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def merge_reports(reports: dict[str, dict[str, Any]], failed: dict[str, str] | None = None
                  ) -> dict[str, Any]:
    """One table over models x systems from per-model reports."""
    from alignx.eval.report import COLUMNS

    rows = []
    for m, r in reports.items():
        for s, row in r["systems"].items():
            cells = {k: (row.get(k) or {}).get("value") for k, _, _ in COLUMNS}
            cost = r.get("cost", {}).get("systems", {}).get(s, {})
            rows.append({"model": m, "system": s, **cells,
                         "latency_ms_p50": cost.get("latency_ms_p50"),
                         "peak_rss_mib": cost.get("peak_rss_mib")})
    judges = {m: r["judges"] for m, r in reports.items()}
    return {"models": list(reports), "rows": rows, "judges": judges, "failed": failed or {}}


def comparison_markdown(comparison: dict[str, Any]) -> str:
    """Models x systems table (values only; each model's report.md has the CIs)."""
    from alignx.eval.report import COLUMNS

    head = ["model", "system", *[f"{t} {a}" for _, t, a in COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * len(COLUMNS)]
    for r in comparison["rows"]:
        vals = ["—" if r.get(k) is None else f"{r[k]:.1f}" for k, _, _ in COLUMNS]
        lines.append(f"| {r['model']} | {r['system']} | " + " | ".join(vals) + " |")
    ids = sorted({f"{a}: {j}" for js in comparison["judges"].values() for a, j in js.items()})
    lines += ["", "Judges: " + "; ".join(ids)]
    for m, err in comparison.get("failed", {}).items():
        lines.append(f"\n**{m} failed**: {err}")
    return "\n".join(lines)


def _plot_comparison(comparison: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = comparison["rows"]
    if not rows:
        return
    models = comparison["models"]
    systems = list(dict.fromkeys(r["system"] for r in rows))
    fig, ax = plt.subplots(figsize=(2 + 1.8 * len(models), 4))
    w = 0.8 / len(systems)
    for i, s in enumerate(systems):
        vals = [next((r["alignment_score"] for r in rows if r["model"] == m and r["system"] == s
                      and r["alignment_score"] is not None), np.nan) for m in models]
        ax.bar(np.arange(len(models)) + i * w - 0.4 + w / 2, vals, w, label=s)
    ax.set_xticks(np.arange(len(models)), models)
    ax.set_ylabel("average alignment score (WR + TI - SS) / 3")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
