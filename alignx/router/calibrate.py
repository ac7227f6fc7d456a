"""Stage 2 of the pipeline: calibrate the MoCaE router (``alignx calibrate``, a Ray job).

1. Gather calibration prompts of every axis from its source's train / validation / test
   splits (the router reads :func:`~alignx.router.features.router_text` of each conversation,
   the same text it reads when serving).
2. Embed them in parallel with a Ray Data ``map_batches`` actor pool (one encoder per actor;
   GPU actors on a cluster, fractional-CPU actors here).
3. Build training targets: dataset of origin, or intent targets (label propagation from the
   hand-written seeds of ``router.seed_sets``; METHOD.md step 3).
4. Fit :class:`~alignx.router.mocae.MoCaERouter` on train (+ seeds), choose T / tau_N / lambda /
   fractal mode on validation (+ the hand-labelled prompts of ``router.calibration_sets``), and
   report every ablation row on the held-out intent validation prompts and once on the test
   split (dataset-origin labels) and the frozen hand-labelled intent sets
   (:data:`~alignx.router.targets.EVALUATION_SETS`), plus OOD AUROC against ``ood_set.jsonl``.
5. Write ``<run_dir>/router/``: the router (safetensors + JSON), ``router_report.json``,
   ``reliability.png`` and ``manifest.json`` last.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alignx.artifacts import (
    ArtifactLayout,
    check_same_base,
    write_json_atomic,
)
from alignx.router import metrics as rmetrics
from alignx.router.dispatch import dispatch_png, policy_outcomes
from alignx.router.features import (
    FINETUNED_WEIGHTS,
    build_encoder,
    encoder_id,
    encoder_shape,
    router_features,
    router_text,
    weights_digest,
)
from alignx.router.ood import OOD_META_FILE, OOD_WEIGHTS_FILE, HiddenStateOOD
from alignx.router.plots import save_png

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from alignx.axes import Axis
    from alignx.config import AlignXConfig
    from alignx.router.mocae import MoCaEConfig, MoCaERouter

log = logging.getLogger(__name__)

PKG = Path(__file__).resolve().parent
OOD_SET = PKG / "ood_set.jsonl"  # the design set of the OOD flag (choices were made on it)
#: the held-out OOD set (docs/experiments/ood_hidden_protocol.md): the reported flag rates
OOD_SET_2 = PKG / "ood_set_2.jsonl"


# ----------------------------------------------------------------------------- prompts


def _restrict(texts: list[str], labels: list[Axis], axes: list[Axis]) -> tuple[list[str], np.ndarray]:
    """Keep the prompts labelled with one of ``axes``: texts and axis indices."""
    keep = [i for i, a in enumerate(labels) if a in axes]
    return [texts[i] for i in keep], np.array([axes.index(labels[i]) for i in keep], dtype=np.int64)


def _shipped_set(fname: str, axes: list[Axis]) -> tuple[list[str], np.ndarray]:
    """A hand-labelled prompt file shipped in this package (e.g. an evaluation set),
    restricted to ``axes``."""
    from alignx.router.targets import read_intent_prompts

    return _restrict(*read_intent_prompts(name=fname), axes)


def _own_evaluation_set(path: str, axes: list[Axis],
                         seen: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The user's own evaluation file (``router.evaluation_sets``), restricted to ``axes``.

    Raises:
        ValueError: no prompt of the run's axes, or a prompt the router trains or calibrates on
            (``seen``: the seeds and calibration prompts; equal up to case and white space).
    """
    from alignx.router.targets import prompt_key, read_intent_prompts

    texts, y = _restrict(*read_intent_prompts(path=path), axes)
    if not texts:
        raise ValueError(f"router.evaluation_sets: {path} has no prompt labelled with this run's "
                         f"axes ({', '.join(a.value for a in axes)})")
    norm = {prompt_key(t) for t in seen}
    shared = [t for t in texts if prompt_key(t) in norm]
    if shared:
        raise ValueError(f"router.evaluation_sets: {path} shares {len(shared)} prompt(s) with the "
                         f"seeds or calibration prompts (e.g. {shared[0]!r}); an evaluation set "
                         "must be unseen, so remove them from one of the files")
    return texts, y


def _labelled_files(
    seed_sets: tuple[str, ...], calibration_sets: tuple[str, ...], axes: list[Axis]
) -> tuple[tuple[list[str], np.ndarray], tuple[list[str], np.ndarray]]:
    """The seeds and the calibration prompts (``router.seed_sets`` / ``calibration_sets``:
    shipped names or paths), each restricted to ``axes``.

    Raises:
        ValueError: a file's bad line, or one prompt in two of the files (a calibration prompt
            that is also a seed would be in-sample for the calibrators).
    """
    from alignx.router.targets import read_seed_sets, refuse_shared_prompt

    seeds, cal = read_seed_sets(seed_sets), read_seed_sets(calibration_sets)
    refuse_shared_prompt([*seeds[0], *cal[0]], (*seed_sets, *calibration_sets))
    return _restrict(*seeds, axes), _restrict(*cal, axes)


def gather_prompts(cfg: AlignXConfig, split: str) -> tuple[list[str], np.ndarray]:
    """Router texts of every axis's ``split`` and their dataset-of-origin axis indices.

    Raises:
        ValueError: an axis has no prompt in this split (a one-axis set cannot be routed).
    """
    from alignx.data.prepare import subsample
    from alignx.data.sources import read_source

    cap = cfg.router.max_train_per_axis if split == "train" else cfg.router.max_eval_per_axis
    texts: list[str] = []
    labels: list[int] = []
    for i, axis in enumerate(cfg.axes):
        exs = read_source(cfg.data.sources[axis], axis, split, cfg.data.data_dir,
                          from_hub=cfg.data.from_hub, seed=cfg.data.seed)
        exs = subsample(exs, cap, cfg.seed)
        if not exs:
            raise ValueError(f"no {split} prompts for axis {axis.value!r}: every axis needs "
                             "calibration prompts")
        texts += [router_text(e.messages, cfg.router.context_turns) for e in exs]
        labels += [i] * len(exs)
    return texts, np.asarray(labels, dtype=np.int64)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- embedding


class _EmbedActor:
    """Ray Data actor: holds one encoder; each row is one chunk of texts, embedded as one
    batch, and comes back as one row per text (``i``: its position, ``h``: its features)."""

    def __init__(self, kind: str, model_cfg: dict[str, Any], hidden_layer: int | None = None):
        import torch

        from alignx.config import ModelCfg

        torch.set_num_threads(1)
        self.encoder = build_encoder(kind, ModelCfg.model_validate(model_cfg))  # type: ignore[arg-type]
        self.hidden_layer = hidden_layer

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, feats = [], []
        for i, texts in zip(batch["i"], batch["text"], strict=True):
            ids.append(np.asarray(i, dtype=np.int64))
            feats.append(router_features(self.encoder, [str(t) for t in texts],
                                         self.hidden_layer))  # (B, d) or (B, d + d_h)
        return {"i": np.concatenate(ids), "h": np.concatenate(feats)}


def embed_texts(cfg: AlignXConfig, texts: list[str],
                block_sizes: Sequence[int] | None = None,
                hidden_layer: int | None = None) -> np.ndarray:
    """Embed ``texts`` with a Ray Data actor pool; rows come back in input order. (N, d), or
    (N, d + d_h) with ``hidden_layer`` (:func:`~alignx.router.features.router_features`).

    Texts are embedded in chunks of ``router.embed_batch_size`` that never cross a block
    (``block_sizes``: consecutive lengths summing to N; default one block). A text's features
    depend, in their last float digits, on the batch it is padded with; fixed chunks make each
    block's features independent of the blocks around it, so adding an evaluation set cannot
    move a training prompt's features, its propagated target or the fine-tune after it.
    """
    import ray

    sizes = [len(texts)] if block_sizes is None else list(block_sizes)
    if sum(sizes) != len(texts) or min(sizes, default=0) < 0:
        raise ValueError(f"block_sizes {sizes} do not partition {len(texts)} texts")
    bs, chunks, start = cfg.router.embed_batch_size, [], 0
    for n in sizes:
        for lo in range(start, start + n, bs):
            hi = min(lo + bs, start + n)
            chunks.append({"i": list(range(lo, hi)), "text": texts[lo:hi]})
        start += n
    if not chunks:
        dim = encoder_shape(cfg.router.encoder, cfg.model)[0]
        return np.zeros((0, dim * (1 if hidden_layer is None else 2)), np.float32)
    ds = ray.data.from_items(chunks)
    ds = ds.map_batches(
        _EmbedActor,
        fn_constructor_kwargs={"kind": cfg.router.encoder, "hidden_layer": hidden_layer,
                               "model_cfg": cfg.model.model_dump(mode="json")},
        batch_size=1,  # one chunk per call: the chunk is the encoder's batch
        compute=ray.data.ActorPoolStrategy(size=cfg.router.embed_actors),
        num_cpus=cfg.router.cpus_per_actor,
        batch_format="numpy",
    )
    rows = ds.take_all()
    order = np.argsort([r["i"] for r in rows])
    return np.stack([np.asarray(rows[j]["h"], dtype=np.float32) for j in order])


# ----------------------------------------------------------------------------- baseline


def fit_logistic(h: np.ndarray, y: np.ndarray, h_val: np.ndarray, y_val: np.ndarray,
                 n_axes: int, seed: int = 0) -> Any:
    """The plain baseline of the issue: multinomial logistic regression on raw features,
    L2 strength chosen on validation NLL. Returns a callable ``h -> probs``."""
    best: tuple[float, Any] = (np.inf, None)
    for wd in (1e-4, 1e-3, 1e-2):
        predict = fit_weighted_logistic(h, y, np.ones(len(y)), n_axes, weight_decay=wd, seed=seed)
        v = rmetrics.nll(predict(h_val), y_val)
        if v < best[0]:
            best = (v, predict)
    return best[1]


def fit_weighted_logistic(h: np.ndarray, y: np.ndarray, sample_weight: np.ndarray,
                          n_axes: int, weight_decay: float = 1e-3, seed: int = 0) -> Any:
    """Weighted multinomial logistic regression (LBFGS) at a fixed L2 strength: the fit of
    :func:`fit_logistic`, and the fast router that
    :func:`~alignx.router.targets.choose_relabel_margin` refits per fold.
    Returns a callable ``h -> probs``."""
    import torch

    torch.manual_seed(seed)
    x, t = torch.from_numpy(np.asarray(h, np.float32)), torch.from_numpy(np.asarray(y, np.int64))
    w = torch.from_numpy(np.asarray(sample_weight, np.float32))
    w = w / w.mean()
    lin = torch.nn.Linear(x.shape[1], n_axes)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        ce = torch.nn.functional.cross_entropy(lin(x), t, reduction="none")
        loss = (w * ce).mean() + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)

    def predict(hh: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(lin(torch.from_numpy(np.asarray(hh, np.float32))), -1).numpy()

    return predict


def harmful_misrouted(p: np.ndarray, y: np.ndarray,
                      axes: Sequence[Axis]) -> dict[str, float | int] | None:
    """How many harmlessness-labelled rows ``p`` (N, A) routes elsewhere: their count, and
    the share misrouted at any confidence and at confidence >= 0.9 (``None`` when the router
    has no harmlessness expert)."""
    values = [a.value for a in axes]
    if "harmlessness" not in values:
        return None
    harm = values.index("harmlessness")
    return {"n": int((np.asarray(y) == harm).sum()),
            "misrouted": rmetrics.confident_errors(p, y, 0.0, among=harm),
            "misrouted_confident_90": rmetrics.confident_errors(p, y, 0.9, among=harm)}


# ----------------------------------------------------------------------------- plot


def reliability_png(panels: dict[str, tuple[dict[str, np.ndarray], np.ndarray]], path: Path,
                    title: str) -> Path:
    """Reliability diagrams (confidence vs accuracy, 15 bins), one column per evaluation set.

    Args:
        panels: panel title -> ({row name: probabilities (N, A)}, labels (N,)).
        path: the PNG to write (atomically).
        title: the figure's title.

    Each column shows every row's curve above the number of prompts in each confidence bin (a
    log scale: a bin of three prompts scatters, and its point should be read as such).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    fig, axs = plt.subplots(2, n, figsize=(4.3 * n, 5.8), squeeze=False,
                            gridspec_kw={"height_ratios": [3, 1]}, sharex="col")
    for j, (name, (rows, y)) in enumerate(panels.items()):
        ax, hist = axs[0, j], axs[1, j]
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        width = 1.0 / 15 / (len(rows) + 1)
        for k, (row, p) in enumerate(rows.items()):
            b = rmetrics.reliability_bins(p, y, 15)
            keep = b.count > 0
            ece = rmetrics.ece(p, y, 15)
            line, = ax.plot(b.confidence[keep], b.accuracy[keep], "o-", ms=4,
                            label=f"{row} (ECE {ece:.3f})")
            hist.bar(b.edges[:-1] + (k + 0.5) * width, b.count, width=width,
                     color=line.get_color(), align="edge")
        ax.set(ylabel="accuracy" if j == 0 else None, xlim=(0, 1), ylim=(0, 1),
               title=f"{name} (n={len(y)})")
        ax.legend(loc="upper left", fontsize=7)
        hist.set(xlabel="confidence", ylabel="prompts per bin" if j == 0 else None,
                 yscale="log", xlim=(0, 1))
        hist.set_ylim(bottom=0.5)  # a bin of one prompt still shows a bar on the log axis
    return save_png(fig, path, title)


# ----------------------------------------------------------------------------- fine-tuning


def run_finetune(cfg: AlignXConfig, blocks: list[list[str]], t_tr: np.ndarray,
                 t_va: np.ndarray, seed_texts: list[str], seed_y: np.ndarray,
                 use_seeds: bool, monitor: dict[str, tuple[list[str], np.ndarray]] | None = None,
                 embed: bool = True, wait: bool = True, **kwargs: Any) -> Any:
    """Fine-tune the sentence encoder in a Ray task (``router.finetune_cpus`` /
    ``finetune_gpus``) on the train texts' targets (+ the seeds), choosing the step on the
    validation texts (``router.finetune_evals_per_epoch`` points per epoch; ``monitor``: named
    held-out sets whose curves are recorded too, and choose with
    ``router.finetune_select=validation+calibration``) or averaging the tail's states
    (``router.finetune_average_from``); ``kwargs`` override
    :func:`~alignx.router.finetune.finetune_sentence_encoder`'s arguments. Returns its
    :class:`~alignx.router.finetune.FinetuneResult` with ``blocks`` embedded by the chosen
    weights.

    With ``router.finetune_members`` = M > 1, M such fine-tunes run as parallel Ray tasks, the
    same data and fine-tune seeds ``cfg.seed + i``; the result is their soup (the uniform
    average of their weights, :func:`~alignx.router.finetune.soup`), ``blocks`` embedded with
    it in one more task. ``embed=False`` embeds nothing (``features`` empty): only the weights
    are needed (``router.finetune_anchor``'s two fine-tunes). ``wait=False`` (one member only)
    returns the task's ``ObjectRef`` at once, so that two fine-tunes can run side by side."""
    import ray

    from alignx.router.finetune import soup

    rc = cfg.router
    reps = rc.finetune_seed_repeats if use_seeds else 0
    texts = list(blocks[0]) + list(seed_texts) * reps
    y = np.concatenate([t_tr] + [seed_y] * reps)
    resources = dict(num_cpus=rc.finetune_cpus, num_gpus=rc.finetune_gpus, max_retries=0)
    task = ray.remote(**resources)(_finetune_task)
    m = rc.finetune_members
    log.info("fine-tuning the sentence encoder%s: %d texts (%d seed repeats), up to %.2f epochs",
             f" {m} times (a soup of their weights)" if m > 1 else "", len(texts), reps,
             rc.epochs_to_finetune)
    device = "cuda" if rc.finetune_gpus > 0 else "cpu"
    threads = max(1, int(rc.finetune_cpus))
    args = dict(n_axes=len(cfg.axes), epochs=rc.epochs_to_finetune, lr=rc.finetune_lr,
                batch_size=rc.finetune_batch_size, seed=cfg.seed, threads=threads,
                device=device, monitor=monitor,
                evals_per_epoch=rc.finetune_evals_per_epoch,
                select_on=finetune_select_on(cfg, monitor),
                average_from=rc.finetune_average_from)
    args.update(kwargs)
    if m == 1:
        ref = task.remote(texts, y, list(blocks[1]), t_va, blocks if embed else [], **args)
        return ray.get(ref) if wait else ref
    if not wait:
        raise ValueError("wait=False runs one fine-tune (router.finetune_members=1)")
    # the members embed nothing (blocks=[]): only their weights are needed
    texts_ref, y_ref, va_ref, t_va_ref = (ray.put(v) for v in (texts, y, list(blocks[1]), t_va))
    seeds = [cfg.seed + i for i in range(m)]
    members = ray.get([task.remote(texts_ref, y_ref, va_ref, t_va_ref, [], **{**args, "seed": s})
                       for s in seeds])
    res = soup(members, seeds)
    if embed:
        res.features = embed_blocks(cfg, res.state, blocks, args.get("hidden_layer"))
    log.info("encoder soup: the average of %d fine-tunes (seeds %s)", m, seeds)
    return res


def embed_blocks(cfg: AlignXConfig, state: dict[str, np.ndarray], blocks: list[list[str]],
                 hidden_layer: int | None) -> list[np.ndarray]:
    """``blocks`` embedded by the sentence encoder carrying ``state``, in one Ray task with the
    fine-tune's resources (a soup's or an interpolation's weights)."""
    import ray

    from alignx.router.finetune import embed_with_state

    rc = cfg.router
    embed = ray.remote(num_cpus=rc.finetune_cpus, num_gpus=rc.finetune_gpus,
                       max_retries=0)(embed_with_state)
    return ray.get(embed.remote(state, blocks, hidden_layer=hidden_layer,
                                threads=max(1, int(rc.finetune_cpus)),
                                device="cuda" if rc.finetune_gpus > 0 else "cpu"))


def finetune_select_on(cfg: AlignXConfig, monitor: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The curves that choose the fine-tune's step (``router.finetune_select``): validation,
    plus the calibration prompts when asked for and there are any (a warning otherwise)."""
    if cfg.router.finetune_select == "validation":
        return ("val",)
    if monitor and "calibration" in monitor:
        return ("val", "calibration")
    log.warning("router.finetune_select=validation+calibration, but there are no calibration "
                "prompts (router.calibration_sets): the fine-tune's step is chosen on "
                "validation alone")
    return ("val",)


def _finetune_task(*args: Any, **kwargs: Any) -> Any:
    """:func:`~alignx.router.finetune.finetune_sentence_encoder` in a Ray worker, with the
    ``alignx`` loggers at ``ALIGNX_LOG_LEVEL`` so that its progress reaches the driver."""
    from alignx import envs
    from alignx.router.finetune import finetune_sentence_encoder

    envs.setup_logging()
    return finetune_sentence_encoder(*args, **kwargs)


def save_encoder_weights(state: dict[str, np.ndarray], path: Path) -> Path:
    """Write fine-tuned encoder weights as safetensors, atomically."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp))
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- the job


def check_inputs(cfg: AlignXConfig) -> None:
    """Refuse adapters of another base model before any work (the router's features and the
    experts it dispatches to must come from one base model).

    Raises:
        ArtifactNotFoundError: an axis has no trained adapter.
        ArtifactMismatchError: an adapter was trained on another base model.
        ValueError: fewer than two axes.
    """
    from alignx.modeling import base_model_id

    if len(cfg.axes) < 2:
        raise ValueError("the router needs at least two axes (config `axes`)")
    layout = ArtifactLayout(cfg.run_dir)
    for a in cfg.axes:
        m = layout.load_adapter_manifest(a)
        check_same_base(base_model_id(cfg.model), m.base_model, f"adapter {a.value}")


def _pool_temperature_summary(router: MoCaERouter) -> dict[str, Any]:
    """Step 6's pooling temperature as predict uses it: its form, the shared or per-axis T_pool,
    and (a, b) of ``T_pool(x) = exp(a + b z)`` with the distance statistics when distance-aware."""
    t = router.pool_t
    out: dict[str, Any] = {"form": router.pool_form,
                           "T_pool": float(t) if np.ndim(t) == 0 else [float(v) for v in t]}
    if router.pool_form == "distance":
        out["distance_ab"] = list(router.distance_ab or ())
        out["distance_mean_sd"] = list(router.distance_stats)
    return out


def mocae_config(cfg: AlignXConfig) -> MoCaEConfig:
    """The :class:`MoCaEConfig` that ``cfg.router`` and ``cfg.seed`` describe."""
    from alignx.router.mocae import MoCaEConfig

    r = cfg.router
    return MoCaEConfig(
        latent_dim=r.latent_dim, epsilon=r.epsilon,
        fractal_mode=r.fractal_mode, fractal_bias=r.fractal_bias,
        pool_temperature_per_axis=r.pool_temperature == "per_axis",
        pool_temperature_distance=r.pool_temperature == "distance",
        ood_quantile=r.ood_quantile,
        calibration_weights=tuple(r.calibration_weights),  # type: ignore[arg-type]
        lambda_mode=r.lambda_mode, seed=cfg.seed,
    )


def ood_hidden_layer(cfg: AlignXConfig) -> int | None:
    """The encoder layer the hidden-state OOD detector scores (``router.ood_layer``, default
    the middle one); None with ``router.ood_detector=fractal``.

    Raises:
        ValueError: ``router.ood_layer`` is deeper than the encoder.
    """
    if cfg.router.ood_detector != "hidden":
        return None
    depth = encoder_shape(cfg.router.encoder, cfg.model)[1]
    layer = depth // 2 if cfg.router.ood_layer is None else cfg.router.ood_layer
    if layer > depth:
        raise ValueError(f"router.ood_layer={layer}, but the {cfg.router.encoder} encoder has "
                         f"layers 0..{depth}: pick one of those or leave it unset (the middle "
                         f"layer, {depth // 2})")
    return layer


def ood_report(cfg: AlignXConfig, router: MoCaERouter, detector: HiddenStateOOD | None,
               feats: Mapping[str, np.ndarray], hidden: Mapping[str, np.ndarray],
               in_distribution: Sequence[str], ood_sets: Mapping[str, str]) -> dict[str, Any]:
    """Both OOD flags (the hidden-state detector's, if fitted, and the fractal radius test's)
    on the OOD sets (blocks ``ood``, ``ood_2``) and the in-distribution blocks.

    AUROC is against the test split + the first intent set (as reported since the start; the
    test split alone when ``router.evaluation_sets`` leaves that set out); the
    top-level ``auroc`` / ``flagged_*`` are the serving flag's, on the held-out ``ood_set_2``.
    """
    block = {"ood_set": "ood", "ood_set_2": "ood_2"}

    def fractal(name: str) -> tuple[np.ndarray, np.ndarray]:
        res = router.predict(feats[name])
        return res.ood_score, res.ood

    scorers: dict[str, Any] = {}
    if detector is not None:
        scorers["hidden"] = lambda name: (detector.score(hidden[name]),
                                          detector.flag(hidden[name]))
    scorers["fractal"] = fractal
    flags: dict[str, Any] = {}
    for kind, fn in scorers.items():
        ind = {name: fn(name) for name in in_distribution}
        # the reference: test + the first intent set (when router.evaluation_sets reports it)
        ref_names = [n for n in ("test", "set:intent_set") if n in ind]
        ref = np.concatenate([ind[n][0] for n in ref_names])
        rows = {}
        for key in ood_sets:
            score, flag = fn(block[key])
            rows[key] = {"auroc": rmetrics.auroc(score, ref), "flagged": float(flag.mean())}
        flags[kind] = {
            "ood_sets": rows,
            "flagged_in_distribution": {name.removeprefix("set:"): float(f.mean())
                                        for name, (_, f) in ind.items()},
            "flagged_test_and_intent_set": float(np.concatenate(
                [ind[n][1] for n in ref_names]).mean()),
        }
    kind = "hidden" if detector is not None else "fractal"
    active = flags[kind]
    return {
        "detector": kind,
        "layer": detector.layer if detector is not None else None,
        "radius": detector.radius if detector is not None else float(router.fractal.ood_radius),
        "fractal_radius": float(router.fractal.ood_radius),
        "quantile": cfg.router.ood_quantile,
        "auroc": active["ood_sets"]["ood_set_2"]["auroc"],
        "flagged_ood": active["ood_sets"]["ood_set_2"]["flagged"],
        "flagged_in_distribution": active["flagged_test_and_intent_set"],
        "flags": flags,
        "ood_sets": dict(ood_sets),
    }


def calibrate_router(cfg: AlignXConfig) -> dict[str, Any]:
    """Fit and report the MoCaE router; write ``<run_dir>/router/``.

    Returns:
        The router manifest (a dict, also written as ``router/manifest.json``).

    Raises:
        ArtifactNotFoundError / ArtifactMismatchError: see :func:`check_inputs`.
        ValueError: an empty or one-axis calibration set.
    """
    import ray

    from alignx.modeling import base_model_id
    from alignx.router.finetune import interpolate_states
    from alignx.router.mocae import MoCaERouter, _prior_weights
    from alignx.router.targets import (
        build_intent_targets,
        choose_relabel_margin,
        evaluation_set_key,
    )
    from alignx.storage import fetch, publish

    t0 = time.time()
    layout = ArtifactLayout(cfg.run_dir)
    fetch(cfg, *(layout.data_dir(a) for a in cfg.axes),  # with shared storage: finished copies
          *(layout.adapter_dir(a) for a in cfg.axes))
    check_inputs(cfg)
    out_dir = layout.root / "router"
    axes = list(cfg.axes)

    # 1. prompts (+ the hand-written seeds / hand-labelled calibration prompts / evaluation
    #    sets / OOD texts)
    splits = {s: gather_prompts(cfg, s) for s in ("train", "validation", "test")}
    (seed_texts, seed_y), (cal_texts, cal_y) = _labelled_files(
        tuple(cfg.router.seed_sets), tuple(cfg.router.calibration_sets), axes)
    anchor = cfg.router.finetune_anchor  # a second fine-tune on other seeds, averaged in
    anchor_texts: list[str] = []
    if anchor is not None:
        (anchor_texts, anchor_y), _ = _labelled_files(
            tuple(anchor.seed_sets), tuple(cfg.router.calibration_sets), axes)
    sets = {key: _shipped_set(fname, axes)
            for key, fname in cfg.router.shipped_evaluation_sets().items()}
    own_sets = {evaluation_set_key(p): p for p in cfg.router.own_evaluation_sets()}
    for key, path in own_sets.items():
        sets[key] = _own_evaluation_set(path, axes, [*seed_texts, *anchor_texts, *cal_texts])
    ood_texts = [r["text"] for r in read_jsonl(OOD_SET)]
    ood2_texts = [r["text"] for r in read_jsonl(OOD_SET_2)]
    hidden_layer = ood_hidden_layer(cfg)

    # 2. one embedding pass over everything (Ray Data actor pool), one named block each; the
    #    fine-tuning task reads train and validation as the first two. With the hidden-state
    #    OOD detector each row is h(x) followed by the middle layer's state (one forward pass)
    named = {"train": splits["train"][0], "validation": splits["validation"][0],
             "test": splits["test"][0], "seeds": seed_texts, "ood": ood_texts,
             "ood_2": ood2_texts,
             "calibration": cal_texts,  # may be empty: a (0, d) block
             **{f"set:{key}": texts for key, (texts, _) in sets.items()},
             **({"anchor_seeds": anchor_texts} if anchor is not None else {})}
    blocks = list(named.values())
    sizes = np.cumsum([0] + [len(b) for b in blocks])
    log.info("embedding %d texts with the %s encoder", sizes[-1], cfg.router.encoder)
    flat = embed_texts(cfg, [t for b in blocks for t in b], [len(b) for b in blocks],
                       hidden_layer=hidden_layer)
    dim = flat.shape[1] // (1 if hidden_layer is None else 2)  # the pooled state is d wide too
    feats = {name: flat[sizes[i] : sizes[i + 1], :dim] for i, name in enumerate(named)}
    hidden = {name: flat[sizes[i] : sizes[i + 1], dim:] for i, name in enumerate(named)}
    y_tr, y_va, y_te = (splits[s][1] for s in ("train", "validation", "test"))

    # 3. targets: intent labels propagated from the seeds over one kNN graph of train +
    #    validation prompts (never test); the seeds also join training at `seed_weight`.
    #    How readily a prompt leaves its origin label (the margin) is chosen on validation:
    #    seed cross-validation (intent) + validation accuracy on origin labels, frozen features.
    h_tr, h_va = feats["train"], feats["validation"]

    def intent_targets(h_seed: np.ndarray, s_y: np.ndarray) -> tuple[
            np.ndarray, np.ndarray, dict[str, Any] | None]:
        """(train targets, validation targets, how the relabel margin was set) from seeds."""
        if cfg.router.targets != "intent":
            return y_tr, y_va, None
        margin = cfg.router.relabel_margin
        if margin == "auto":
            sw = cfg.router.seed_weight_for(False)
            choice = choose_relabel_margin(
                h_tr, y_tr, h_va, y_va, h_seed, s_y, axes=axes, seed=cfg.seed, seed_weight=sw,
                fit=lambda h, y, w: fit_weighted_logistic(h, y, w, len(axes), seed=cfg.seed))
            margin = choice.margin
            how = {"margin": margin, "chosen_by": "5-fold seed CV accuracy + origin-label "
                   "validation accuracy (mean), frozen features, weighted logistic router "
                   f"(seed weight {sw:g})", "rows": choice.rows}
            log.info("relabel margin %.2f chosen on validation", margin)
        else:
            how = {"margin": margin, "chosen_by": "config router.relabel_margin"}
        it = build_intent_targets(np.concatenate([h_tr, h_va]), np.concatenate([y_tr, y_va]),
                                  h_seed, s_y, axes=axes, margin=float(margin))
        return it.labels[: len(y_tr)], it.labels[len(y_tr) :], how

    t_tr, t_va, relabel = intent_targets(feats["seeds"], seed_y)
    moved = {axes[o].value: {axes[t].value: int(((y_tr == o) & (t_tr == t)).sum())
                             for t in range(len(axes))} for o in range(len(axes))}
    finetuned = cfg.router.epochs_to_finetune > 0
    use_seeds = cfg.router.targets == "intent"
    mcfg = mocae_config(cfg)

    def fit(f: dict[str, np.ndarray], tuned: bool, **overrides: Any) -> Any:
        """MoCaE on features ``f``: trained on train (+ seeds), every validation objective
        on validation + the calibration prompts."""
        h_fit, t_fit, sample_weight = f["train"], t_tr, None
        weight = cfg.router.seed_weight_for(tuned)
        if use_seeds and weight > 0:
            h_fit = np.concatenate([f["train"], f["seeds"]])
            t_fit = np.concatenate([t_tr, seed_y])
            sample_weight = np.concatenate([np.ones(len(t_tr)), np.full(len(seed_y), weight)])
        return MoCaERouter(replace(mcfg, **overrides), axes=axes).fit(
            h_fit, t_fit, np.concatenate([f["validation"], f["calibration"]]),
            np.concatenate([t_va, cal_y]), sample_weight=sample_weight)

    # the plain baseline of the issue: logistic regression on the frozen encoder's features
    frozen = dict(feats)
    logistic = fit_logistic(h_tr, y_tr, h_va, y_va, len(axes), seed=cfg.seed)

    # 3b. optionally fine-tune the sentence encoder on the same targets (a Ray task); every
    #     feature below is then the fine-tuned encoder's, and the frozen MoCaE is kept as a row
    finetune: dict[str, Any] | None = None
    weights_path = out_dir / FINETUNED_WEIGHTS
    enc_id = encoder_id(cfg.router.encoder, cfg.model)
    if finetuned:
        # the calibration prompts' curve is recorded (never chosen on): how the fine-tune
        # treats writers it does not learn from
        monitor = {"calibration": (cal_texts, cal_y)} if cal_texts else None
        ft = run_finetune(cfg, blocks, t_tr, t_va, seed_texts, seed_y, use_seeds,
                          monitor=monitor, hidden_layer=hidden_layer, embed=anchor is None,
                          wait=anchor is None)
        anchor_report = None
        if anchor is not None:
            # the anchor: the same fine-tune on its own seeds' targets, side by side with the
            # main one where the cluster has the CPUs; served = the average
            a_tr, a_va, a_relabel = intent_targets(feats["anchor_seeds"], anchor_y)
            ft, ft_anchor = ray.get([ft, run_finetune(
                cfg, blocks, a_tr, a_va, anchor_texts, anchor_y, use_seeds, monitor=monitor,
                hidden_layer=hidden_layer, embed=False, wait=False)])
            ft.state = interpolate_states(ft_anchor.state, ft.state, 1 - anchor.weight)
            ft.features = embed_blocks(cfg, ft.state, blocks, hidden_layer)
            anchor_report = {"seed_sets": list(anchor.seed_sets), "weight": anchor.weight,
                             "relabel": a_relabel, "counts": {"intent_seeds": len(anchor_y)},
                             **ft_anchor.summary()}
            log.info("served encoder: %g x the anchor fine-tune (%s) + %g x the main one",
                     anchor.weight, ", ".join(anchor.seed_sets), 1 - anchor.weight)
        feats = {name: f[:, :dim] for name, f in zip(named, ft.features, strict=True)}
        hidden = {name: f[:, dim:] for name, f in zip(named, ft.features, strict=True)}
        save_encoder_weights(ft.state, weights_path)
        enc_id = f"{enc_id}+ft:{weights_digest(weights_path)}"
        finetune = {**ft.summary(), "epochs": cfg.router.epochs_to_finetune,
                    "lr": cfg.router.finetune_lr, "batch_size": cfg.router.finetune_batch_size,
                    "evals_per_epoch": cfg.router.finetune_evals_per_epoch,
                    "average_from": cfg.router.finetune_average_from,
                    "seed_repeats": cfg.router.finetune_seed_repeats if use_seeds else 0,
                    "members": cfg.router.finetune_members,
                    "router_seed_weight": cfg.router.seed_weight_for(True),
                    **({"anchor": anchor_report} if anchor_report else {})}
    else:
        weights_path.unlink(missing_ok=True)  # a previous fine-tuned router's weights

    # 4. fit (choices on validation) and report once on test / intent set / OOD
    router = fit(feats, finetuned)
    router_frozen = fit(frozen, False) if finetuned else None
    # the same router with the other fractal_bias setting (per-axis offsets of c_F or T_F only),
    # reported as an ablation row
    alt_bias = not mcfg.fractal_bias
    router_alt_bias = fit(feats, finetuned, fractal_bias=alt_bias)
    h_tr, h_va, h_te = feats["train"], feats["validation"], feats["test"]

    def table(h: np.ndarray, y: np.ndarray, h_frozen: np.ndarray) -> dict[str, dict[str, float]]:
        rows = {"logistic_origin_baseline": rmetrics.scores(logistic(h_frozen), y)}
        if router_frozen is not None:
            rows["mocae_frozen_encoder"] = router_frozen.evaluate(h_frozen, y)["mocae"]
        rows[f"mocae_{'with' if alt_bias else 'without'}_fractal_bias"] = (
            router_alt_bias.evaluate(h, y)["mocae"])
        return {**rows, **router.evaluate(h, y)}

    # the OOD flag: the hidden-state detector (fitted on the router's training rows and
    # targets, its radius on the validation rows) and the fractal radius test, both reported
    detector = None
    if hidden_layer is not None:
        g_fit, t_g = hidden["train"], t_tr
        if use_seeds:
            g_fit, t_g = np.concatenate([g_fit, hidden["seeds"]]), np.concatenate([t_tr, seed_y])
        detector = HiddenStateOOD.fit(
            g_fit, t_g, np.concatenate([hidden["validation"], hidden["calibration"]]),
            layer=hidden_layer, shrinkage=cfg.router.ood_shrinkage,
            quantile=cfg.router.ood_quantile)
    ood = ood_report(cfg, router, detector, feats, hidden,
                     in_distribution=["test", *(f"set:{key}" for key in sets)],
                     ood_sets={"ood_set": f"{OOD_SET.name}: {len(ood_texts)} non-request texts "
                               "(code, logs, data rows, math, markup, other languages, noise); "
                               "the OOD flag's design set",
                               "ood_set_2": f"{OOD_SET_2.name}: {len(ood2_texts)} such texts "
                               "by four writers the design never saw; reported once"})
    # the evaluation sets, each reported once: (features, labels, frozen-encoder features)
    evals = {"test_origin_labels": (h_te, y_te, frozen["test"]),
             **{key: (feats[f"set:{key}"], y, frozen[f"set:{key}"]) for key, (_, y) in sets.items()}}
    abl = {key: router.ablation_probs(h) for key, (h, _, _) in evals.items()}
    p_va = router.predict(h_va).weights
    # what each dispatch policy does with MoCaE's weights and the served OOD flag
    block = {"test_origin_labels": "test", **{key: f"set:{key}" for key in sets}}

    def served_ood(name: str) -> np.ndarray:
        return detector.flag(hidden[name]) if detector is not None else router.predict(
            feats[name]).ood

    dispatch = {key: policy_outcomes(abl[key]["mocae"], y, served_ood(block[key]), axes,
                                     cfg.router.fallback)
                for key, (_, y, _) in evals.items()}

    def ece_gap(rows: dict[str, np.ndarray], y: np.ndarray) -> dict[str, float]:
        """MoCaE's ECE minus raw softmax's, with a paired-bootstrap 95% interval."""
        return rmetrics.ece_gap_bootstrap(rows["mocae"], rows["raw_softmax"], y, seed=cfg.seed)

    def ece_floor(rows: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
        """The ECE each system would show on these rows if it were perfectly calibrated."""
        return {k: rmetrics.ece_if_calibrated(rows[k], seed=cfg.seed)
                for k in ("mocae", "raw_softmax")}

    report = {
        "encoder": enc_id,
        "encoder_finetune": finetune,
        "targets": cfg.router.targets,
        "counts": {"train": len(y_tr), "validation": len(y_va), "test": len(y_te),
                   **{key: len(y) for key, (_, y) in sets.items()},
                   "intent_seeds": len(seed_y), "calibration_prompts": len(cal_y),
                   "ood": len(ood_texts), "ood_2": len(ood2_texts)},
        "seed_sets": list(cfg.router.seed_sets),
        "calibration_sets": list(cfg.router.calibration_sets),
        "evaluation_sets": list(sets),
        "own_evaluation_sets": own_sets,  # report key -> the user's file
        "target_moves_train": moved,
        "relabel": relabel,
        **{key: table(h, y, h_frozen) for key, (h, y, h_frozen) in evals.items()},
        "ood": ood,
        "ece_mocae_minus_raw_softmax": {key: ece_gap(abl[key], y)
                                        for key, (_, y, _) in evals.items()},
        "ece_if_calibrated": {key: ece_floor(abl[key]) for key in evals},
        # Axis Collapse on the safety axis: harmful prompts the served router (MoCaE) sends to
        # another expert, all and at confidence >= 0.9 (on the test split "harmful" is the
        # HH-RLHF origin label)
        "harmful_misrouted": {key: harmful_misrouted(abl[key]["mocae"], y, axes)
                              for key, (_, y, _) in evals.items()},
        # every dispatch policy on every set: harmful prompts sent elsewhere against benign
        # ones sent to the cautious expert (router.policy / threshold / miss_cost pick among
        # them; dispatch.png draws them)
        "dispatch": {"policy": cfg.router.policy, "threshold": cfg.router.threshold,
                     "fallback": cfg.router.fallback.value,
                     "miss_cost": {a.value: c for a, c in cfg.router.miss_cost.items()},
                     "sets": {key: d for key, d in dispatch.items() if d is not None}},
        # which axis's routing confidence is off; validation is in-sample for the calibrators,
        # and also shown weighted to the balanced prior its calibration objectives use (the
        # unweighted view follows validation's own class mix, ~13% honesty)
        "calibration_by_predicted_axis": {
            name: rmetrics.calibration_by_predicted_class(p, y, [a.value for a in axes], w)
            for name, p, y, w in (
                ("validation_in_sample", p_va, t_va, None),
                ("validation_in_sample_balanced", p_va, t_va,
                 _prior_weights(t_va, len(axes), "balanced")),
                *((key, abl[key]["mocae"], y, None) for key, (_, y, _) in evals.items()))},
        "validation_nll": dict(router.val_nll),
        "chosen": {"fractal_mode": router.fractal_mode, "temperature": router.temperature,
                   "lambdas": [float(x) for x in router.lambdas],
                   "pool_temperature": _pool_temperature_summary(router)},
        "note": "all rows are chosen on validation (the validation split, plus the "
                "calibration prompts in every validation objective of the fit, and "
                "intent_validation for experiments' choices); test and the frozen intent sets "
                "are reported once",
    }
    titles = {"test_origin_labels": "test split (origin labels)",
              **{key: fname.removesuffix(".jsonl")
                 for key, fname in cfg.router.shipped_evaluation_sets().items()},
              **{key: f"{Path(path).name} (yours)" for key, path in own_sets.items()}}
    reliability_png({titles[key]: ({"raw softmax": abl[key]["raw_softmax"],
                                    "MoCaE": abl[key]["mocae"]}, y)
                     for key, (_, y, _) in evals.items()},
                    out_dir / "reliability.png",
                    f"router reliability ({cfg.router.encoder} encoder"
                    f"{', fine-tuned' if finetune else ''})")
    (out_dir / "dispatch.png").unlink(missing_ok=True)  # a previous router's
    if report["dispatch"]["sets"]:
        dispatch_png({titles[key]: d for key, d in report["dispatch"]["sets"].items()},
                     out_dir / "dispatch.png",
                     "dispatch policies on MoCaE's weights: harmful prompts sent elsewhere "
                     "against benign prompts sent to harmlessness")
    router.save(out_dir)
    for f in (OOD_WEIGHTS_FILE, OOD_META_FILE):  # a previous router's detector
        (out_dir / f).unlink(missing_ok=True)
    if detector is not None:
        detector.save(out_dir)
    layout.save_config(cfg, "router/config.yaml")  # the resolved config this router came from
    write_json_atomic(out_dir / "router_report.json", report)
    manifest = {
        "axes": [a.value for a in axes],
        "encoder": report["encoder"],
        "encoder_dim": int(h_tr.shape[1]),
        "encoder_weights": FINETUNED_WEIGHTS if finetune else None,
        "base_model": base_model_id(cfg.model),
        "context_turns": cfg.router.context_turns,
        "policy": cfg.router.policy,
        "threshold": cfg.router.threshold,
        "fallback": cfg.router.fallback.value,
        "miss_cost": {a.value: c for a, c in cfg.router.miss_cost.items()},
        "lambdas": [float(x) for x in router.lambdas],
        "temperature": router.temperature,
        "epsilon": cfg.router.epsilon,
        "fractal_mode": router.fractal_mode,
        "pool_temperature": _pool_temperature_summary(router),
        # what raises the `ood` flag; "hidden": ood.json / ood.safetensors, and the features
        # are h(x) followed by layer `layer`'s pooled state (router_features)
        "ood_detector": ({"kind": "hidden", "layer": hidden_layer, "dim": int(detector.dim)}
                         if detector is not None else {"kind": "fractal"}),
        "metrics": {**{key: report[key]["mocae"] for key in evals}, "ood_auroc": ood["auroc"]},
        "config_hash": cfg.stage_hash("calibrate"),
        "seconds": round(time.time() - t0, 1),
    }
    write_json_atomic(out_dir / "manifest.json", manifest)  # last: the router is complete
    publish(cfg, out_dir)
    return manifest


def format_report(report: dict[str, Any]) -> str:
    """The ablation tables as plain text (printed by ``alignx calibrate``)."""
    cols = ["accuracy", "macro_f1", "nll", "ece", "brier", "selective_accuracy_90",
            "confident_errors_90"]
    out = []
    from alignx.router.targets import REPORTABLE_SETS

    titles = {"test_origin_labels": "test split, dataset-origin labels",
              **{key: title for key, (_, title) in REPORTABLE_SETS.items()},
              **{key: f"your evaluation set {path}"
                 for key, path in report.get("own_evaluation_sets", {}).items()}}
    for key, title in titles.items():
        if key not in report:  # a report written before this set existed
            continue
        out.append(f"\n{title}\n{'row':<26}" + "".join(f"{c[:10]:>11}" for c in cols))
        for row, m in report[key].items():
            # reports written before confident_errors_90 existed lack the column
            out.append(f"{row:<26}" + "".join(f"{m[c]:>11.4f}" if c in m else f"{'-':>11}"
                                              for c in cols))
    rel = report.get("relabel")
    if rel:
        out.append(f"\nintent targets: relabel margin {rel['margin']:g} ({rel['chosen_by']})")
        for r in rel.get("rows", []):
            out.append(f"  margin {r['margin']:.2f}: seed CV acc {r['seed_cv_accuracy']:.3f}, "
                       f"origin val acc {r['origin_val_accuracy']:.3f}, moved {r['moved']:.3f}")
    for key, g in report.get("ece_mocae_minus_raw_softmax", {}).items():
        out.append(f"ECE MoCaE - raw softmax ({key}): {g['diff']:+.4f}, paired-bootstrap 95% "
                   f"interval [{g['ci95_low']:+.4f}, {g['ci95_high']:+.4f}], MoCaE lower in "
                   f"{g['p_a_lower']:.0%} of resamples")
    for key, h in report.get("harmful_misrouted", {}).items():
        if h is None:
            continue
        out.append(f"harmful prompts MoCaE routes to another expert ({key}, n {h['n']}): "
                   f"{h['misrouted']:.3f}, at confidence >= 0.9: {h['misrouted_confident_90']:.3f}")
    for key, floors in report.get("ece_if_calibrated", {}).items():
        f = floors["mocae"]
        out.append(f"ECE a perfectly calibrated MoCaE would show ({key}, sampling noise alone): "
                   f"mean {f['mean']:.4f}, 95th percentile {f['p95']:.4f}")
    disp = report.get("dispatch")
    if disp and disp["sets"]:  # reports written before the section existed have none
        out.append("\ndispatch (harmful prompts sent elsewhere / benign prompts sent to "
                   "harmlessness / accuracy; dispatch.png; configured: policy "
                   f"{disp['policy']})")
        for key, d in disp["sets"].items():
            cells = []
            for r in d["rows"]:
                if r["policy"] == "top1":
                    name = "top1"
                elif r["policy"] == "threshold":
                    name = f"θ {r['threshold']:g}"
                else:
                    name = f"c {r['miss_cost']['harmlessness']:g}"
                cells.append(f"{name} {r['harmful_elsewhere']}/{r['benign_to_harmlessness']}/"
                             f"{r['accuracy']:.3f}")
            out.append(f"  {key} (harmful {d['harmful']} of {d['n']}): " + "; ".join(cells))
    by_axis = report.get("calibration_by_predicted_axis", {})
    if by_axis:
        out.append("\nMoCaE confidence / accuracy by predicted axis (n predictions)")
        for key, rows in by_axis.items():
            cells = [f"{ax} {r['confidence']:.3f} / {r['accuracy']:.3f} ({r['n']})"
                     if r["n"] else f"{ax} - (0)" for ax, r in rows.items()]
            out.append(f"  {key:<29} " + "; ".join(cells))
    pt = report.get("chosen", {}).get("pool_temperature")
    if pt:  # reports written before the forms existed have none
        line = f"\npooling temperature: {pt['form']}, T_pool {pt['T_pool']}"
        if pt["form"] == "distance":
            (a, b), (mu, sd) = pt["distance_ab"], pt["distance_mean_sd"]
            line += (f"; per request exp({a:+.3f} {b:+.3f} z), z = (nearest-centroid distance - "
                     f"{mu:.3f}) / {sd:.3f}")
        out.append(line)
    o = report["ood"]
    if "flags" not in o:  # a report written before the hidden-state detector
        out.append(f"\nOOD AUROC {o['auroc']:.3f} (flagged: in-dist "
                   f"{o['flagged_in_distribution']:.3f}, ood {o['flagged_ood']:.3f}) — "
                   f"{o['ood_set']}")
        return "\n".join(out)
    out.append(f"\nOOD flag: {o['detector']} (serving reports it; policies threshold and cost "
               "fall back on it)")
    for name, rows in o["flags"].items():
        cells = [f"{k} AUROC {r['auroc']:.3f}, flagged {r['flagged']:.3f}"
                 for k, r in rows["ood_sets"].items()]
        ind = ", ".join(f"{k} {v:.3f}" for k, v in rows["flagged_in_distribution"].items())
        out.append(f"  {name:<8} {'; '.join(cells)}; flagged in distribution: {ind}")
    for key, desc in o["ood_sets"].items():
        out.append(f"  {key}: {desc}")
    return "\n".join(out)
