"""Stage 2, step 1b: fine-tune the sentence encoder on the router's own targets.

A frozen all-MiniLM-L6-v2 was trained to place *paraphrases* together, not to separate "asks
for something harmful" from "asks a question with a tempting misconception" from "any other
task". On its frozen features no head we tried does much better than a linear one: linear,
a GELU MLP, RBF kernel features and an RBF SVM all land within ~2 points of each other on
the held-out test split. Fine-tuning the encoder itself for one to two epochs on the
calibration targets moves the features instead.

What this does, and what stays fixed:

* the targets are the ones the frozen router would use (dataset of origin, or intent targets
  propagated from the hand-written seeds on *frozen* features), so fine-tuning never decides
  its own labels; the hand-written seeds join training ``seed_repeats`` times;
* a linear head on the unit-norm sentence embedding (the same pooling + normalisation the
  encoder uses at serving time) is trained with the encoder, class-balanced cross-entropy,
  AdamW;
* ``evals_per_epoch`` times per epoch the validation NLL (class-balanced, like every other
  choice of the router) is measured and the best state is kept: the number of steps is chosen
  on validation, the test split and the intent sets are never looked at. ``select_on`` may add
  held-out curves to the choice (the mean of their balanced NLLs; the calibration job offers
  its hand-labelled calibration prompts), and ``average_from`` replaces the choice by the
  uniform average of the states at the evaluation points of the run's tail (weight averaging
  along one trajectory, as in SWA: Izmailov et al., 2018);
* the head is thrown away: MoCaE (projection, W_r, T, calibrators, lambda) is fitted on the
  fine-tuned features exactly as on frozen ones.

The fine-tuned weights are written to ``<run_dir>/router/encoder/model.safetensors``; the
encoder id in the router manifest then carries their digest
(``sentence:all-MiniLM-L6-v2+ft:<sha256[:12]>``), so serving refuses a router whose encoder
weights were swapped or lost.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """What :func:`finetune_sentence_encoder` returns (a Ray task's return value)."""

    state: dict[str, np.ndarray]  # the encoder's weights: the chosen step's, or the average
    features: list[np.ndarray]  # (N_i, 384) per block (768 with hidden_layer), those weights
    curve: list[dict[str, float]] = field(default_factory=list)  # one point per evaluation
    best_step: int = 0  # the chosen step (the last averaged step when averaging)
    steps: int = 0
    seconds: float = 0.0
    selected_on: tuple[str, ...] = ("val",)  # the curves whose mean balanced NLL chose the step
    averaged_steps: list[int] = field(default_factory=list)  # the states averaged, if any
    #: every evaluation point's weights, {step: state}, when asked for (``keep_states``)
    states: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    #: a soup's members (:func:`soup`): each one's summary, with its fine-tune seed
    members: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        best = next((p for p in self.curve if p["step"] == self.best_step), {})
        out = {"steps": self.steps, "best_step": self.best_step,
               "best_val_nll": best.get("val_nll"), "selected_on": list(self.selected_on),
               "averaged_steps": self.averaged_steps, "seconds": round(self.seconds, 1),
               "curve": self.curve}
        if self.members:
            out["soup"] = self.members
        return out


def soup(members: Sequence[FinetuneResult], seeds: Sequence[int]) -> FinetuneResult:
    """A soup of fine-tunes: the uniform average of the members' weights
    (:func:`average_states`) and each member's summary, its fine-tune ``seed`` added; no
    features yet (embed with :func:`embed_with_state`). The first member's curve and steps
    stand for the soup's (the members share one schedule)."""
    if len(members) != len(seeds) or not members:
        raise ValueError("a soup needs one seed per member and at least one member")
    first = members[0]
    return FinetuneResult(
        state=average_states([m.state for m in members]), features=[], curve=first.curve,
        best_step=first.best_step, steps=first.steps,
        seconds=sum(m.seconds for m in members), selected_on=first.selected_on,
        averaged_steps=first.averaged_steps,
        members=[{"seed": int(s), **{k: v for k, v in m.summary().items() if k != "curve"}}
                 for m, s in zip(members, seeds, strict=True)])


def embed_with_state(state: Mapping[str, np.ndarray], blocks: Sequence[Sequence[str]], *,
                     hidden_layer: int | None = None, threads: int | None = None,
                     device: str = "cpu", encoder: Any = None) -> list[np.ndarray]:
    """Embed ``blocks`` with the sentence encoder carrying ``state`` (the served feature
    function, :func:`~alignx.router.features.router_features`): ``(N_i, 384)`` per block, or
    ``(N_i, 768)`` with ``hidden_layer``. ``encoder``: a SentenceEncoder to load into (tests)."""
    import torch

    from alignx.router.features import SentenceEncoder, router_features

    n_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        enc = encoder if encoder is not None else SentenceEncoder(device=device)
        dev = next(enc.model.parameters()).device
        # np.array copies: a Ray argument's arrays are read-only, which torch warns about
        enc.model.load_state_dict({k: torch.from_numpy(np.array(v)).to(dev)
                                   for k, v in state.items()}, strict=True)
        enc.model.eval()
        return [router_features(enc, list(b), hidden_layer) for b in blocks]
    finally:
        torch.set_num_threads(n_threads)


def evaluation_schedule(n_texts: int, batch_size: int, epochs: float,
                        evals_per_epoch: int) -> tuple[int, int, list[int]]:
    """(steps per epoch, total steps, the steps evaluated at) of a fine-tune of ``n_texts``
    texts: every ``steps_per_epoch // evals_per_epoch`` steps, and the last step."""
    steps_per_epoch = math.ceil(n_texts / batch_size)
    total = max(1, round(epochs * steps_per_epoch))
    every = max(1, steps_per_epoch // max(1, evals_per_epoch))
    return steps_per_epoch, total, sorted({*range(every, total + 1, every), total})


def selection_score(point: Mapping[str, float], select_on: Sequence[str]) -> float:
    """The number a step is chosen by (lower is better): the mean of the balanced NLLs of
    the curves named in ``select_on`` (``val`` and/or monitored set names) at ``point``."""
    return float(np.mean([point[f"{name}_nll"] for name in select_on]))


def average_states(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The uniform average of state dicts (numpy arrays or torch tensors): floating entries
    are averaged in float64 and cast back; integer buffers (position ids) are the last state's."""
    if not states:
        raise ValueError("no states to average")
    out = {}
    for k, last in states[-1].items():
        if np.issubdtype(_np(last).dtype, np.floating):
            out[k] = _like(np.mean([_np(s[k]).astype(np.float64) for s in states], axis=0), last)
        else:
            out[k] = last
    return out


def interpolate_states(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray],
                       alpha: float) -> dict[str, np.ndarray]:
    """``(1 - alpha) * a + alpha * b`` per tensor, in float64 and cast back (WiSE-FT style,
    ``router.finetune_anchor``: two fine-tunes of one start); integer buffers (position ids)
    must agree.

    Raises:
        ValueError: the two states differ in tensors, shapes or integer buffers.
    """
    if a.keys() != b.keys():
        raise ValueError(f"the two encoders differ in tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    out = {}
    for k, va in a.items():
        vb = b[k]
        if va.shape != vb.shape:
            raise ValueError(f"{k}: shapes {va.shape} and {vb.shape}")
        if np.issubdtype(va.dtype, np.floating):
            out[k] = ((1 - alpha) * va.astype(np.float64) + alpha * vb).astype(va.dtype)
        else:
            if not np.array_equal(va, vb):
                raise ValueError(f"{k}: integer tensors differ")
            out[k] = va
    return out


def _np(v: Any) -> np.ndarray:
    """A tensor or array as a numpy array."""
    return v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)


def _like(a: np.ndarray, ref: Any) -> Any:
    """``a`` as ``ref``'s type, dtype and device."""
    if hasattr(ref, "detach"):
        import torch

        return torch.from_numpy(a).to(dtype=ref.dtype, device=ref.device)
    return a.astype(ref.dtype)


def _balanced_weights(y: np.ndarray, n_axes: int) -> np.ndarray:
    """Per-class weights that give every axis the same total weight, (A,)."""
    counts = np.bincount(y, minlength=n_axes).astype(np.float64)
    if np.any(counts == 0):
        missing = [i for i in range(n_axes) if counts[i] == 0]
        raise ValueError(f"fine-tuning data has no example of axis index {missing}")
    return counts.sum() / (n_axes * counts)


def finetune_sentence_encoder(
    train_texts: Sequence[str],
    train_y: np.ndarray,
    val_texts: Sequence[str],
    val_y: np.ndarray,
    blocks: Sequence[Sequence[str]],
    *,
    n_axes: int,
    epochs: float,
    lr: float = 3e-5,
    head_lr: float = 1e-3,
    batch_size: int = 32,
    weight_decay: float = 0.01,
    evals_per_epoch: int = 2,
    seed: int = 0,
    threads: int | None = None,
    device: str = "cpu",
    encoder: Any = None,
    monitor: Mapping[str, tuple[Sequence[str], np.ndarray]] | None = None,
    select_on: Sequence[str] = ("val",),
    average_from: float | None = None,
    extra_eval_steps: Collection[int] = (),
    keep_states: bool = False,
    hidden_layer: int | None = None,
) -> FinetuneResult:
    """Fine-tune the sentence encoder on ``(train_texts, train_y)``; keep the best state by
    validation NLL (or ``select_on``), or average the tail's states; embed ``blocks`` with it.

    Args:
        train_texts, train_y: training texts and target axis indices (N,).
        val_texts, val_y: validation texts and targets (M,); choose the number of steps.
        blocks: text lists to embed with the chosen weights (returned in order).
        n_axes: number of axes A.
        epochs: passes over the training texts (fractions allowed; > 0).
        lr, head_lr: AdamW learning rates of the encoder and of the linear head.
        batch_size: texts per step.
        weight_decay: AdamW weight decay.
        evals_per_epoch: validation NLL measurements per epoch (and at the end).
        seed: shuffling and head initialisation.
        threads: ``torch.set_num_threads`` for the duration (None: leave as is).
        device: torch device of the bundled encoder (ignored when ``encoder`` is given).
        encoder: a :class:`~alignx.router.features.SentenceEncoder` to train in place
            (tests pass a small one); default: the bundled all-MiniLM-L6-v2.
        monitor: named held-out sets ``{name: (texts, targets)}`` whose balanced NLL and
            accuracy join every point of the curve (``<name>_nll``, ``<name>_balanced_acc``);
            they choose the step only when ``select_on`` names them.
        select_on: the curves that choose the step: the state with the lowest mean balanced
            NLL over them is kept (``"val"``: validation; other names: ``monitor`` sets).
        average_from: instead of choosing a step, return the uniform average of the states at
            the evaluation points at or after this fraction of the run (in [0, 1]; 0.5 = the
            second half). None: choose.
        extra_eval_steps: further steps to evaluate at (and choose among), besides the
            ``evals_per_epoch`` schedule; never averaged. Training is the same whichever
            steps are evaluated (evaluation draws no random numbers).
        keep_states: return every evaluation point's weights in ``states`` (for experiments
            that compare choices on one trajectory; about 90 MB each for MiniLM).
        hidden_layer: the blocks' features also carry this layer's pooled state
            (:func:`~alignx.router.features.router_features`: ``(N_i, 768)``).

    Returns:
        The best state, the blocks' features, the validation curve.

    Raises:
        ValueError: empty data, ``epochs <= 0``, an axis with no training example, a
            ``select_on`` name that is neither ``val`` nor a monitored set, or
            ``average_from`` outside [0, 1].
    """
    import torch

    from alignx.router.features import SentenceEncoder, router_features
    from alignx.router.mocae import _prior_weights

    if epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    unknown = sorted(set(select_on) - {"val", *(monitor or {})})
    if not select_on or unknown:
        raise ValueError(f"select_on names {unknown or 'nothing'}: use 'val' and/or monitored "
                         f"sets ({sorted(monitor or {})})")
    if average_from is not None and not 0 <= average_from <= 1:
        raise ValueError(f"average_from must be in [0, 1], got {average_from}")
    if len(train_texts) == 0 or len(val_texts) == 0:
        raise ValueError("fine-tuning needs training and validation texts")
    train_y = np.array(train_y, dtype=np.int64)  # copies: a Ray argument is read-only
    val_y = np.array(val_y, dtype=np.int64)
    if len(train_y) != len(train_texts) or len(val_y) != len(val_texts):
        raise ValueError("texts and targets differ in length")
    t0 = time.time()
    n_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    rng_state, cuda_rng = torch.get_rng_state(), None  # restored in `finally`
    try:
        enc = encoder if encoder is not None else SentenceEncoder(device=device)
        st = enc.model  # SentenceTransformer: Transformer -> mean Pooling -> Normalize
        dev = next(st.parameters()).device
        # dropout (and the head's default init) draw from torch's global RNG: seed it, so that a
        # fine-tune is reproducible for its seed; the caller gets its RNG state back at the end.
        # manual_seed also reseeds CUDA, which loading the encoder may just have initialised.
        if torch.cuda.is_initialized():
            cuda_rng = torch.cuda.get_rng_state_all()
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        head = torch.nn.Linear(enc.dim, n_axes)
        with torch.no_grad():
            head.weight.uniform_(-(enc.dim**-0.5), enc.dim**-0.5, generator=gen)
            head.bias.zero_()
        head.to(dev)
        opt = torch.optim.AdamW(
            [{"params": [p for p in st.parameters() if p.requires_grad], "lr": lr},
             {"params": head.parameters(), "lr": head_lr}], weight_decay=weight_decay)
        cls_w = torch.tensor(_balanced_weights(train_y, n_axes), dtype=torch.float32, device=dev)
        _balanced_weights(val_y, n_axes)  # validation needs every axis too (raises otherwise)
        # the router's own validation objective (MoCaERouter.fit): every axis counts the same
        w_val = torch.from_numpy(_prior_weights(val_y, n_axes, "balanced")).to(dev)
        t_tr, t_val = torch.from_numpy(train_y).to(dev), torch.from_numpy(val_y).to(dev)
        # sentence-transformers >= 6 renamed tokenize() to preprocess()
        prep = getattr(st, "preprocess", None) or st.tokenize

        def embed(texts: Sequence[str]) -> torch.Tensor:  # (B, dim), the serving path's pooling
            feats = prep(list(texts))
            feats = {k: v.to(dev) if hasattr(v, "to") else v for k, v in feats.items()}
            return st(feats)["sentence_embedding"]

        def balanced_nll_acc(texts: Sequence[str], t: torch.Tensor,
                             w: torch.Tensor) -> tuple[float, float]:
            st.eval()
            with torch.no_grad():
                logits = torch.cat([head(embed(texts[i : i + 128]))
                                    for i in range(0, len(texts), 128)])
            st.train()
            ce = torch.nn.functional.cross_entropy(logits, t, reduction="none").double()
            return float((ce * w).sum()), float((logits.argmax(1) == t).double().mul(w).sum())

        def val_nll() -> tuple[float, float]:
            return balanced_nll_acc(val_texts, t_val, w_val)

        watched = {}  # name -> (texts, targets, balanced weights)
        for name, (m_texts, m_y) in (monitor or {}).items():
            m_y = np.array(m_y, dtype=np.int64)  # a copy: Ray arguments are read-only
            watched[name] = (list(m_texts), torch.from_numpy(m_y).to(dev),
                             torch.from_numpy(_prior_weights(m_y, n_axes, "balanced")).to(dev))

        def point(step: int, nll: float, acc: float) -> dict[str, float]:
            p = {"step": step, "epoch": round(step / steps_per_epoch, 3), "val_nll": nll,
                 "val_balanced_acc": acc}
            for name, args in watched.items():
                p[f"{name}_nll"], p[f"{name}_balanced_acc"] = balanced_nll_acc(*args)
            return p

        steps_per_epoch, total, schedule = evaluation_schedule(
            len(train_texts), batch_size, epochs, evals_per_epoch)
        schedule = set(schedule)
        rng = np.random.default_rng(seed)
        order = np.zeros(0, dtype=np.int64)
        curve = [point(0, *val_nll())]
        best_score, best_step, best_state = math.inf, 0, None  # step 0's head is untrained
        tail: list[dict[str, Any]] = []  # the states to average (average_from)
        averaged: list[int] = []  # and their steps
        states: dict[int, dict[str, np.ndarray]] = {}  # keep_states
        extra = set(extra_eval_steps)
        log.info("fine-tuning the sentence encoder: %d steps of %d texts (%.2f epochs)",
                 total, batch_size, epochs)
        st.train()
        for step in range(1, total + 1):
            if len(order) < batch_size:
                order = np.concatenate([order, rng.permutation(len(train_texts))])
            idx, order = order[:batch_size], order[batch_size:]
            logits = head(embed([train_texts[i] for i in idx]))  # (B, A)
            loss = torch.nn.functional.cross_entropy(logits, t_tr[idx], weight=cls_w)
            opt.zero_grad()
            loss.backward()
            opt.step()
            scheduled = step in schedule
            if scheduled or step in extra:
                nll, acc = val_nll()
                curve.append(point(step, nll, acc))
                shown = "".join(f", {name} NLL {curve[-1][name + '_nll']:.4f} bal. acc "
                                f"{curve[-1][name + '_balanced_acc']:.3f}" for name in watched)
                log.info("encoder fine-tune step %d/%d: loss %.4f, val NLL %.4f, val bal. acc "
                         "%.3f%s (%.0f s)", step, total, loss.item(), nll, acc, shown,
                         time.time() - t0)
                if keep_states:
                    states[step] = {k: v.detach().cpu().numpy().copy()
                                    for k, v in st.state_dict().items()}
                if average_from is not None:
                    if scheduled and step >= average_from * total:
                        tail.append(copy.deepcopy(st.state_dict()))
                        averaged.append(step)
                        best_step = step
                    continue
                score = selection_score(curve[-1], select_on)
                if score < best_score:
                    best_score, best_step = score, step
                    best_state = copy.deepcopy(st.state_dict())
        if average_from is not None:
            best_state = average_states(tail)
        assert best_state is not None
        st.load_state_dict(best_state)
        st.eval()
        features = [router_features(enc, list(b), hidden_layer) for b in blocks]
    finally:
        torch.set_num_threads(n_threads)
        torch.set_rng_state(rng_state)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    state = {k: v.detach().cpu().contiguous().numpy() for k, v in best_state.items()}
    if averaged:
        log.info("encoder fine-tuned: the average of the states at steps %s of %d, %.0f s",
                 averaged, total, time.time() - t0)
    else:
        log.info("encoder fine-tuned: best step %d of %d (mean NLL over %s %.4f), %.0f s",
                 best_step, total, "+".join(select_on), best_score, time.time() - t0)
    return FinetuneResult(state=state, features=features, curve=curve, best_step=best_step,
                          steps=total, seconds=time.time() - t0, selected_on=tuple(select_on),
                          averaged_steps=averaged, states=states)
