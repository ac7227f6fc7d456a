"""The one typed configuration tree of AlignX.

A run is described by one YAML file (``jobs/configs/*.yaml``) plus dotted ``key=value``
overrides (``train.lora.rank=32``). :func:`load_config` validates the whole tree on the
driver, before any Ray work starts, and reports every problem at once, naming the key
and the fix. Workers receive ``cfg.model_dump(mode="json")`` and re-validate it with
``AlignXConfig.model_validate`` so the config is typed at both ends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from alignx.axes import AXES, Axis

SourceName = Literal["alpaca", "beavertails", "hh_rlhf", "truthfulqa"]


class AlignXConfigError(ValueError):
    """A configuration problem; the message lists every bad key with its fix."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelCfg(_Section):
    name: str = Field(
        "smollm2-135m",
        description="Registry name (see `alignx models`), a local model directory, or a Hub id.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto = bfloat16 on GPU, float32 on CPU."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the Hub (off by default).")
    max_seq_len: int = Field(512, ge=16, le=32768, description="Longest tokenized example (prompt+answer).")


class DataCfg(_Section):
    data_dir: str | None = Field(
        None, description="Folder with <source>/<split>.jsonl files; default $ALIGNX_DATA_DIR."
    )
    from_hub: bool = Field(
        False, description="Load from the Hugging Face Hub instead of data_dir (needs internet)."
    )
    sources: dict[Axis, SourceName] = Field(
        default_factory=lambda: {
            Axis.HELPFULNESS: "alpaca",
            Axis.HARMLESSNESS: "hh_rlhf",
            Axis.HONESTY: "truthfulqa",
        },
        description="Which source feeds each axis.",
    )
    max_train_per_axis: int | None = Field(None, ge=1, description="Cap on training examples per axis.")
    max_eval_per_axis: int | None = Field(None, ge=1, description="Cap on validation/test examples per axis.")
    inject: bool = Field(True, description="Inject the axis template (system prompt) before the chat template.")
    seed: int = Field(0, description="Seed for subsampling and Hub splits.")

    @model_validator(mode="after")
    def _check_sources(self) -> DataCfg:
        from alignx.axes import AXIS_SPECS

        bad = [
            f"data.sources.{a.value}={s!r} (valid: {', '.join(AXIS_SPECS[a].sources)})"
            for a, s in self.sources.items()
            if s not in AXIS_SPECS[a].sources
        ]
        if bad:
            raise ValueError("source cannot feed that axis: " + "; ".join(bad))
        return self


class LoraCfg(_Section):
    rank: int = Field(8, ge=1, le=1024, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; default: the registry's targets for the model."
    )


class DeepSpeedCfg(_Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage; 2 is the LoRA default.")
    torch_adam: bool = Field(True, description="Use torch AdamW inside DeepSpeed (no fused-op JIT compile).")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload the optimizer to CPU (compiles cpu_adam).")
    gradient_clipping: float = Field(1.0, ge=0)


class ScalingCfg(_Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers per axis.")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, description="Fractional CPUs fit 3 trainers on a laptop.")
    gpus_per_worker: float = Field(1.0, ge=0)


class OptimCfg(_Section):
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    epochs: int = Field(1, ge=1)
    micro_batch_size: int = Field(4, ge=1, description="Per-worker batch per step.")
    grad_accum: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1)


class TrainCfg(_Section):
    lora: LoraCfg = LoraCfg()
    deepspeed: DeepSpeedCfg = DeepSpeedCfg()
    scaling: ScalingCfg = ScalingCfg()
    optim: OptimCfg = OptimCfg()
    checkpoint_every: int = Field(50, ge=1, description="Optimizer steps between checkpoints.")
    max_failures: int = Field(2, ge=-1, description="Worker-group restarts Ray Train allows (-1: forever).")
    eval_batches: int | None = Field(None, ge=1, description="Cap on held-out batches for eval loss.")
    threads_per_worker: int | None = Field(
        None, ge=1, description="torch intra-op threads per worker; default: its CPU share, at least 1."
    )
    multitask: bool = Field(
        True, description="`alignx run` also trains the multi-task LoRA baseline (one adapter on "
        "every axis's data, as many steps as the experts together): the interference baseline of "
        "the stage-1 report and the `multitask` eval system. false skips it (about half the "
        "pipeline's training compute); the experts do not depend on it.",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainCfg:
        if self.scaling.use_gpu and self.deepspeed.offload_optimizer and self.deepspeed.torch_adam:
            raise ValueError(
                "train.deepspeed.offload_optimizer=true needs DeepSpeed's CPU Adam: "
                "set train.deepspeed.torch_adam=false"
            )
        return self


DEFAULT_FINETUNE_EPOCHS = 2.0
SEED_WEIGHT_FROZEN = 50.0  # chosen by cross-validation over the seeds (session 2)
SEED_WEIGHT_FINETUNED = 1.0  # the seeds already joined fine-tuning; lowest validation NLL
#: router.seed_sets' default: the four files of the earlier default plus the frozen sets 5 to 8
#: (docs/experiments/wise_2_protocol.md); the earlier four are the default anchor's seeds
DEFAULT_ANCHOR_SEED_SETS: tuple[str, ...] = ("intent_seeds.jsonl", "intent_seeds_2.jsonl",
                                             "intent_set_2.jsonl", "intent_seeds_3.jsonl")
DEFAULT_SEED_SETS: tuple[str, ...] = (*DEFAULT_ANCHOR_SEED_SETS, "intent_set_5.jsonl",
                                      "intent_set_6.jsonl", "intent_set_7.jsonl",
                                      "intent_set_8.jsonl")
DEFAULT_ANCHOR_WEIGHT = 0.625  # W38: served = 0.625 * anchor + 0.375 * main


def finetune_epochs_for(encoder: str, epochs: float | None) -> float:
    """``router.finetune_epochs`` with its default resolved (0 = frozen encoder): the sentence
    encoder fine-tunes for DEFAULT_FINETUNE_EPOCHS, the base model's features never."""
    if epochs is not None:
        return float(epochs)
    return DEFAULT_FINETUNE_EPOCHS if encoder == "sentence" else 0.0


def anchor_refusal(encoder: str, targets: str, epochs: float, members: int) -> str | None:
    """Why ``router.finetune_anchor`` cannot apply to a router with these settings (``epochs``
    resolved: 0 = frozen encoder), or None where it can. One rule for both the default (no
    anchor where it cannot apply) and the refusal of an explicit one."""
    if encoder != "sentence" or targets != "intent" or epochs <= 0:
        return ("router.finetune_anchor averages two fine-tunes of the sentence encoder on "
                "intent targets: it needs router.encoder=sentence, router.targets=intent and "
                "router.finetune_epochs > 0 (or set finetune_anchor: null)")
    if members != 1:
        return ("router.finetune_anchor and router.finetune_members > 1 (a soup) cannot be "
                "combined; use one of them")
    return None


def check_labelled_files(v: tuple[str, ...], required: bool) -> tuple[str, ...]:
    """Seed or calibration files: shipped hand-labelled names or existing paths, never an
    evaluation set, none named twice (``required``: at least one).

    Raises:
        ValueError: names the file and the choices.
    """
    from alignx.router.targets import EVALUATION_SETS, SHIPPED_SEED_SETS

    if not v and required:
        raise ValueError("empty: name at least one seed file, e.g. [intent_seeds.jsonl]")
    for name in v:
        if Path(name).name in {fname for fname, _ in EVALUATION_SETS.values()}:
            raise ValueError(f"{name!r} is an evaluation set: a router is never trained or "
                             f"calibrated on it. Use {' / '.join(SHIPPED_SEED_SETS)} or "
                             "your own file")
        if name not in SHIPPED_SEED_SETS and not Path(name).is_file():
            raise ValueError(f"{name!r} is neither a shipped hand-labelled file "
                             f"({', '.join(SHIPPED_SEED_SETS)}) nor an existing file")
    if len(set(v)) != len(v):
        raise ValueError(f"a file is named twice: {list(v)}")
    return v


class FinetuneAnchorCfg(_Section):
    """``router.finetune_anchor``: a second encoder fine-tune, averaged into the served one."""

    seed_sets: tuple[str, ...] = Field(
        description="Seed files of the anchor fine-tune (names or paths, as router.seed_sets); "
        "its intent targets are built from them as the main fine-tune's are from "
        "router.seed_sets.")
    weight: float = Field(
        gt=0, lt=1, description="The anchor's share of the served encoder's weights: served = "
        "weight * anchor + (1 - weight) * main, per tensor.")

    @field_validator("seed_sets")
    @classmethod
    def _seed_sets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return check_labelled_files(v, required=True)


class RouterCfg(_Section):
    """Stage 2: the MoCaE router and its calibration job (METHOD.md, Stage 2)."""

    encoder: Literal["sentence", "base"] = Field(
        "sentence", description="h(x): all-MiniLM-L6-v2 (384-d) or the base model's mean-pooled states."
    )
    targets: Literal["intent", "origin"] = Field(
        "intent", description="Train on intent targets (label propagation from hand-written seeds) "
        "or on the dataset each prompt comes from.",
    )
    seed_sets: tuple[str, ...] = Field(
        DEFAULT_SEED_SETS,
        description="Hand-written intent seed files (intent targets only): names shipped in "
        "alignx/router/ (intent_seeds.jsonl: 360 seeds; intent_seeds_2.jsonl: 756 more, in four "
        "registers, chosen on validation by docs/experiments/intent_seeds_2_protocol.md; "
        "intent_seeds_3.jsonl: 594 boundary cases, adopted by "
        "docs/experiments/seeds_boundary_protocol.md; "
        "intent_set_2.jsonl ... intent_set_8.jsonl: retired frozen sets, ~595 each, the second "
        "a default seed file since docs/experiments/shift_calibration_protocol.md, the fifth to "
        "eighth since docs/experiments/wise_2_protocol.md) or paths to JSON Lines files of "
        "{prompt, axis}. The evaluation sets (intent_set.jsonl, intent_set_9.jsonl, "
        "intent_set_10.jsonl, intent_set_11.jsonl, intent_set_12.jsonl, intent_set_13.jsonl, "
        "intent_validation.jsonl) "
        "are refused: a router is never trained on them.",
    )
    calibration_sets: tuple[str, ...] = Field(
        ("intent_set_3.jsonl",), description="Hand-labelled prompt files (names as for "
        "seed_sets, or paths) that join the validation split in every validation objective of "
        "the MoCaE fit (early stopping, T, T_F, tau_N, lambda, T_pool, OOD radius) and are "
        "never trained on: "
        "prompts by writers the router did not learn from teach the calibrators how far to "
        "trust it on new writers (docs/experiments/shift_calibration_protocol.md; [] = "
        "validation split only). Evaluation sets and files already in seed_sets are refused.",
    )
    finetune_anchor: FinetuneAnchorCfg | None = Field(
        None, description="Weight-space interpolation of two encoder fine-tunes (WiSE-FT "
        "style; docs/experiments/wise_2_protocol.md): the job fine-tunes the encoder once on "
        "router.seed_sets (main) and once on finetune_anchor.seed_sets (anchor), with the same "
        "data, seed and schedule, and serves weight * anchor + (1 - weight) * main; everything "
        "after the encoder uses router.seed_sets. null = one fine-tune. Needs a fine-tuned "
        "sentence encoder, intent targets and router.finetune_members=1. Costs a second "
        "fine-tune. Unset = {seed_sets: [" + ", ".join(DEFAULT_ANCHOR_SEED_SETS) + "], weight: "
        f"{DEFAULT_ANCHOR_WEIGHT}}} (W38, adopted by docs/experiments/wise_2_protocol.md) where "
        "those needs are met and router.seed_sets are not those same files, else null.",
    )
    evaluation_sets: tuple[str, ...] | None = Field(
        None, description="The hand-labelled evaluation sets the calibration job embeds and "
        "reports: shipped file names (intent_validation.jsonl, intent_set.jsonl, "
        "intent_set_9.jsonl ... intent_set_13.jsonl) and/or paths to your own JSON Lines files "
        "of {prompt, axis} (reported under the file's stem); unset = every shipped set; [] = the "
        "test split only. The router is the same whatever the list (these sets are never "
        "trained or calibrated on); each set costs an embedding pass, two with a fine-tuned "
        "encoder. The OOD AUROC's in-distribution reference is the test split plus "
        "intent_set.jsonl when it is listed.",
    )
    seed_weight: float | None = Field(
        None, ge=0, description="Weight of the hand-written intent seeds in the router's training "
        f"loss (intent targets only); unset = {SEED_WEIGHT_FROZEN:g} with a frozen encoder (seed "
        f"cross-validation), {SEED_WEIGHT_FINETUNED:g} with a fine-tuned one (validation NLL).",
    )
    relabel_margin: float | Literal["auto"] = Field(
        "auto", description="Intent targets: a prompt leaves its origin label when the seeds' "
        "propagated share beats the origin's by more than this (0 = any majority, 1 = never); "
        "auto = chosen from 0..1 by seed cross-validation + origin-label validation accuracy.",
    )
    finetune_epochs: float | None = Field(
        None, ge=0, description="Fine-tune the sentence encoder on the router's targets for "
        "this many epochs (see finetune_average_from); 0 = frozen encoder; unset = "
        f"{DEFAULT_FINETUNE_EPOCHS} for the sentence encoder, 0 for the base encoder.",
    )
    finetune_lr: float = Field(3e-5, gt=0, description="Encoder learning rate when fine-tuning.")
    finetune_batch_size: int = Field(32, ge=1, description="Texts per fine-tuning step.")
    finetune_seed_repeats: int = Field(
        3, ge=0, description="Times the hand-written intent seeds join the fine-tuning data "
        "(3 x the 4,688 default seeds; it was 10 x 360 with the first seed set alone)."
    )
    finetune_evals_per_epoch: int = Field(
        8, ge=1, description="Evaluation points per epoch of the encoder fine-tune (the steps "
        "it averages, or chooses among); 8 since docs/experiments/finetune_select_protocol.md "
        "(it was 2).")
    finetune_select: Literal["validation", "validation+calibration"] = Field(
        "validation", description="With router.finetune_average_from=null, what chooses the "
        "fine-tune's step: the validation NLL, or the mean of the validation and calibration "
        "prompts' NLLs (router.calibration_sets; validation alone when there are none).")
    finetune_average_from: float | None = Field(
        0.5, ge=0, le=1, description="The encoder's weights are the uniform average of its "
        "states at the evaluation points from this fraction of the fine-tune on (0.5 = the "
        "second half; adopted by docs/experiments/finetune_select_protocol.md); null = keep one "
        "step instead (router.finetune_select).")
    finetune_members: int = Field(
        1, ge=1, description="Encoders fine-tuned, each on the same data with fine-tune seed "
        "seed, seed + 1, ... (shuffling, head initialisation, dropout), as parallel Ray tasks; "
        "the router's encoder is the uniform average of their weights (a 'soup'; one encoder "
        "to serve whatever the count). 1 = one fine-tune. 3 was measured and not adopted: no "
        "more accurate on new writers, worse calibrated (docs/experiments/seed_soup_protocol.md).")
    finetune_cpus: float = Field(2.0, gt=0, description="CPUs of the fine-tuning Ray task.")
    finetune_gpus: float = Field(0.0, ge=0, description="GPUs of the fine-tuning Ray task.")
    latent_dim: int = Field(256, ge=2, description="k of the latent projection P.")
    epsilon: float = Field(0.05, gt=0, description="Fractal calibrator granularity.")
    fractal_mode: Literal["auto", "knn", "corr_integral"] = Field(
        "auto", description="Fractal score: literal correlation integral, kNN local scale, or auto "
        "(the lower validation NLL).",
    )
    fractal_bias: bool = Field(
        False, description="Fit a per-axis log-offset of the fractal calibrator with its "
        "temperature on validation NLL (the axes' density scores are not on one scale); false = "
        "temperature only. The report shows the other setting as an ablation row.",
    )
    pool_temperature: Literal["shared", "per_axis", "distance"] = Field(
        "shared", description="Pooling temperature of MoCaE's step 6: one for all requests; one "
        "per predicted axis (fitted on the validation prompts routed there; an axis routed fewer "
        "than 30 of them keeps the shared one); or one per request that grows with its distance "
        "from the training clouds, exp(a + b z), z its standardised nearest-centroid distance "
        "(adopted by docs/experiments/seeds_4_protocol.md's rule, then reverted: it lowers "
        "ECE on dataset prompts but raises it on hand-written ones). All keep the argmax (top1 "
        "decisions); under policy=threshold, confidences near the threshold can change the "
        "fallback set. The report shows the other settings as rows.",
    )
    ood_quantile: float | None = Field(
        0.99, gt=0, le=1, description="OOD radius = this quantile of the validation prompts' "
        "OOD score (~1% of in-distribution requests flagged at 0.99); null = the largest "
        "validation score (router.ood_detector=hidden) or the largest fractal radius (fractal).",
    )
    ood_detector: Literal["hidden", "fractal"] = Field(
        "hidden", description="What raises the OOD flag that serving reports and the threshold "
        "policy falls back on: hidden = Mahalanobis distance of the encoder's middle-layer "
        "state to the class means (adopted by docs/experiments/ood_hidden_protocol.md: it "
        "flags 94-98% of non-request texts where the fractal test flagged 0-2%); fractal = "
        "the fractal calibrator's radius test in the router's latent space (METHOD.md). The "
        "calibrated weights are the same either way; the report shows both flags.",
    )
    ood_layer: int | None = Field(
        None, ge=0, description="router.ood_detector=hidden: the encoder layer whose pooled "
        "state is scored (0 = embeddings); unset = the middle layer (3 of MiniLM's 6).",
    )
    ood_shrinkage: float = Field(
        0.1, ge=0, le=1, description="router.ood_detector=hidden: weight of the scaled identity "
        "in the shared covariance.",
    )
    calibration_weights: tuple[float, float] = Field(
        (0.6, 0.4), description="(lambda_1 fractal, lambda_2 natural), the paper's weights."
    )
    lambda_mode: Literal["fixed", "fitted"] = Field(
        "fitted", description="fixed = the paper's lambdas; fitted = lambda_1 by validation NLL."
    )
    policy: Literal["top1", "threshold", "cost"] = Field(
        "threshold", description="Dispatch: top1 = the largest weight; threshold = it when the "
        "confidence reaches router.threshold and the request is in distribution, else "
        "router.fallback; cost = the expert with the least expected cost of a miss under "
        "router.miss_cost (argmax of miss_cost[a] * weight[a]), router.fallback when out of "
        "distribution.")
    threshold: float = Field(0.5, ge=0, le=1, description="threshold policy: min confidence.")
    fallback: Axis = Field(Axis.HARMLESSNESS, description="Expert used below the threshold or OOD.")
    miss_cost: dict[Axis, float] = Field(
        default_factory=dict, description="cost policy: the cost of sending a request whose "
        "right expert is this axis to another one, relative to 1 for axes not named; e.g. "
        "{harmlessness: 3} sends a request to the cautious expert once its weight is a third of "
        "the largest other weight. The calibration report's `dispatch` section shows what "
        "each cost does on every evaluation set.")
    context_turns: int = Field(0, ge=0, description="Earlier turns the router reads before the last user turn.")
    max_train_per_axis: int | None = Field(2000, ge=1, description="Calibration prompts per axis (train split).")
    max_eval_per_axis: int | None = Field(400, ge=1, description="Validation/test prompts per axis.")
    embed_batch_size: int = Field(64, ge=1)
    embed_actors: int = Field(1, ge=1, description="Ray Data actor pool size for embedding.")
    cpus_per_actor: float = Field(1.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _default_anchor(cls, data: Any) -> Any:
        """Unset ``finetune_anchor``: the shipped anchor (W38) where a fine-tuned sentence
        encoder on intent targets with one member can take it and ``seed_sets`` are not the
        anchor's own, else null (so that, e.g., ``router.encoder=base`` needs no
        ``finetune_anchor: null``, and a config saved before the anchor existed, with the
        earlier default's seed files, still means one fine-tune)."""
        if not isinstance(data, dict) or "finetune_anchor" in data:
            return data
        encoder = data.get("encoder", "sentence")
        try:
            epochs = finetune_epochs_for(encoder, data.get("finetune_epochs"))
            takes = (anchor_refusal(encoder, data.get("targets", "intent"), epochs,
                                    int(data.get("finetune_members", 1))) is None
                     # the anchor's own seeds as the main ones: two equal fine-tunes
                     and tuple(data.get("seed_sets", DEFAULT_SEED_SETS))
                     != DEFAULT_ANCHOR_SEED_SETS)
        except (TypeError, ValueError):
            return data  # the fields' own validation names the bad value
        anchor = ({"seed_sets": DEFAULT_ANCHOR_SEED_SETS, "weight": DEFAULT_ANCHOR_WEIGHT}
                  if takes else None)
        return {**data, "finetune_anchor": anchor}

    @field_validator("seed_sets", "calibration_sets")
    @classmethod
    def _labelled_sets(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        return check_labelled_files(v, required=info.field_name == "seed_sets")

    @field_validator("miss_cost")
    @classmethod
    def _miss_cost(cls, v: dict[Axis, float]) -> dict[Axis, float]:
        bad = {a.value: c for a, c in v.items() if not (math.isfinite(c) and c > 0)}
        if bad:
            raise ValueError(f"costs must be finite numbers > 0, got {bad}; 1 is the cost of "
                             "an axis not named")
        return v

    @field_validator("evaluation_sets")
    @classmethod
    def _evaluation_sets(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        from alignx.router.targets import (
            EVALUATION_SETS,
            REPORTABLE_SETS,
            RETIRED_EVALUATION_SETS,
            evaluation_set_key,
        )

        if v is None:
            return v
        known = [fname for fname, _ in EVALUATION_SETS.values()]
        retired = [fname for fname, _ in RETIRED_EVALUATION_SETS.values()]
        unknown = [name for name in v if name not in known + retired
                   and not Path(name).is_file()]
        if unknown:
            what = (f"{unknown[0]!r} is neither a shipped evaluation set nor an existing file"
                    if len(unknown) == 1 else
                    f"{unknown} are neither shipped evaluation sets nor existing files")
            raise ValueError(f"{what}; choose among {', '.join(known)}, or give the path of "
                             "your own {prompt, axis} JSON Lines file (or leave it unset for "
                             f"every shipped set; the retired {', '.join(retired)} only for a "
                             "router not trained on them)")
        keys = [evaluation_set_key(name) for name in v]
        clash = sorted({k for k in keys if keys.count(k) > 1})
        if clash:
            raise ValueError(f"two sets would be reported as {clash}: {list(v)}; name each set "
                             "once and give your own files distinct names")
        shadow = [name for name in v if name not in known + retired
                  and evaluation_set_key(name) in {"test_origin_labels", *REPORTABLE_SETS}]
        if shadow:
            raise ValueError(f"{shadow}: your file's name would be reported under a shipped "
                             "set's key; rename it")
        return v

    def reports(self, fname: str) -> bool:
        """Whether the calibration job reports the shipped evaluation set ``fname``."""
        return self.evaluation_sets is None or fname in self.evaluation_sets

    def shipped_evaluation_sets(self) -> dict[str, str]:
        """The shipped sets the calibration job reports, report key -> file: the evaluation
        sets (unset: all), and the retired ones only where named."""
        from alignx.router.targets import EVALUATION_SETS, RETIRED_EVALUATION_SETS

        out = {key: fname for key, (fname, _) in EVALUATION_SETS.items() if self.reports(fname)}
        return out | {key: fname for key, (fname, _) in RETIRED_EVALUATION_SETS.items()
                      if fname in (self.evaluation_sets or ())}

    def own_evaluation_sets(self) -> tuple[str, ...]:
        """The listed evaluation files that are not shipped ones (paths of the user's own)."""
        from alignx.router.targets import REPORTABLE_SETS

        known = {fname for fname, _ in REPORTABLE_SETS.values()}
        return tuple(n for n in self.evaluation_sets or () if n not in known)

    @model_validator(mode="after")
    def _check(self) -> RouterCfg:
        trained = sorted(set(self.evaluation_sets or ()) & {*self.seed_sets,
                                                             *self.calibration_sets})
        if trained:
            raise ValueError(f"router.evaluation_sets names {trained}, which router.seed_sets or "
                             "router.calibration_sets also uses: an evaluation set must be "
                             "unseen; drop it from one of them")
        both = sorted(set(self.seed_sets) & set(self.calibration_sets))
        if both:
            raise ValueError(f"router.calibration_sets names {both}, which router.seed_sets "
                             "already trains on: calibration prompts must be unseen; drop them "
                             "from one of the two")
        lam = self.calibration_weights
        if min(lam) < 0 or abs(sum(lam) - 1.0) > 1e-6:
            raise ValueError(f"router.calibration_weights must be >= 0 and sum to 1, got {list(lam)}")
        if self.relabel_margin != "auto" and not 0.0 <= self.relabel_margin <= 1.0:
            raise ValueError(f"router.relabel_margin must be in [0, 1] or 'auto', got "
                             f"{self.relabel_margin}")
        if self.encoder == "base" and (self.finetune_epochs or 0) > 0:
            raise ValueError("router.finetune_epochs > 0 needs router.encoder=sentence (the base "
                             "model's features are never fine-tuned); set router.finetune_epochs=0")
        if self.finetune_anchor is not None:
            refusal = anchor_refusal(self.encoder, self.targets, self.epochs_to_finetune,
                                     self.finetune_members)
            if refusal:
                raise ValueError(refusal)
            seen = sorted(set(self.finetune_anchor.seed_sets) & set(self.calibration_sets))
            if seen:
                raise ValueError(f"router.finetune_anchor.seed_sets names {seen}, which "
                                 "router.calibration_sets uses: calibration prompts must be "
                                 "unseen; drop them from one of the two (or set "
                                 "router.finetune_anchor: null)")
            trained = sorted(set(self.evaluation_sets or ()) & set(self.finetune_anchor.seed_sets))
            if trained:
                raise ValueError(f"router.evaluation_sets names {trained}, which "
                                 "router.finetune_anchor.seed_sets trains on: an evaluation set "
                                 "must be unseen")
        return self

    @property
    def epochs_to_finetune(self) -> float:
        """``finetune_epochs`` with its default resolved (0 = frozen encoder)."""
        return finetune_epochs_for(self.encoder, self.finetune_epochs)

    def seed_weight_for(self, finetuned: bool) -> float:
        """``seed_weight`` with its default resolved for a frozen or fine-tuned encoder."""
        if self.seed_weight is not None:
            return float(self.seed_weight)
        return SEED_WEIGHT_FINETUNED if finetuned else SEED_WEIGHT_FROZEN


class H3FusionCfg(_Section):
    """The H3Fusion-style token-level MoE baseline (``alignx.baselines.h3fusion``): per-token
    gates over the frozen axis experts, trained on the union of the axes' training data."""

    steps: int = Field(60, ge=1, description="Optimizer steps of the gate training.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the gates.")
    micro_batch_size: int = Field(4, ge=1, description="Examples per worker per step.")
    gate_top_k: int | None = Field(
        None, ge=1, description="Experts mixed per token (top-k of the gate); null = all (dense).")
    balance_coef: float = Field(
        0.01, ge=0, description="Weight of the load-balancing term on mean gate usage (0 = off).")


class BaselinesCfg(_Section):
    """Baselines trained by this project besides Stage 1's multi-task adapter."""

    h3fusion: H3FusionCfg = H3FusionCfg()


#: Systems an evaluation can compare (model ids of the Serve app): AlignX with the calibrated
#: router, AlignX with the uncalibrated softmax router, and the METHOD.md baselines.
EVAL_SYSTEMS = ("alignx", "alignx-softmax", "base", "multitask", "h3fusion")


class EvalCfg(_Section):
    """Evaluation (METHOD.md, evaluation protocol): which systems, how many prompts, judges."""

    systems: list[str] = Field(
        default_factory=lambda: list(EVAL_SYSTEMS),
        description=f"Systems to evaluate: any of {', '.join(EVAL_SYSTEMS)} or expert-<axis>.",
    )
    win_rate_vs: str = Field(
        "base", description="Opponent B of the helpfulness win rate: a system name, or "
        "'reference' (the dataset's reference outputs as contestant, for LLM judges).",
    )
    prompts_per_axis: int | None = Field(100, ge=1, description="Test prompts per axis (None = all).")
    mc_questions: int | None = Field(
        None, ge=1, description="TruthfulQA questions for MC1/MC2 (None = prompts_per_axis).")
    mc: bool = Field(True, description="Score TruthfulQA MC1/MC2 by log-likelihood.")
    max_tokens: int = Field(64, ge=1, le=4096, description="Generated tokens per answer.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy (reproducible).")
    concurrency: int = Field(8, ge=1, le=256, description="Requests in flight per system.")
    request_timeout_s: float = Field(300.0, gt=0, description="HTTP timeout per request.")
    bootstrap_samples: int = Field(1000, ge=10, description="Bootstrap resamples for 95% CIs.")
    validate_judges: bool = Field(True, description="Report each offline judge's validity.")
    cost: bool = Field(True, description="Measure latency and peak memory per system.")
    cost_prompts: int = Field(8, ge=1, description="Prompts per system for the cost measurement.")
    judges: dict[str, Any] = Field(
        default_factory=dict, description="Judge per axis (alignx.eval.judges.JudgesCfg), e.g. "
        "{harmlessness: {kind: hf, path: /models/beaver-dam-7b}}; default: offline proxies.",
    )
    serve_port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve app.")
    app_name: str = Field("alignx", pattern=r"^[A-Za-z0-9_.-]+$", description="Serve application name.")
    route_prefix: str = Field("/", pattern=r"^/[A-Za-z0-9_./-]*$", description="Serve route prefix.")
    keep_serving: bool = Field(False, description="Leave the app running after the pipeline.")

    @field_validator("systems")
    @classmethod
    def _systems(cls, v: list[str]) -> list[str]:
        experts = {f"expert-{a.value}" for a in AXES}
        bad = [s for s in v if s not in EVAL_SYSTEMS and s not in experts]
        if bad:
            raise ValueError(f"unknown systems {bad}; valid: {', '.join(EVAL_SYSTEMS)}, "
                             f"{', '.join(sorted(experts))}")
        if not v or len(set(v)) != len(v):
            raise ValueError(f"systems must be non-empty and without duplicates, got {v}")
        return v

    @field_validator("judges")
    @classmethod
    def _judges(cls, v: dict[str, Any]) -> dict[str, Any]:
        from alignx.eval.judges import JudgesCfg  # lazy: judges imports this module's package

        return JudgesCfg.model_validate(v).model_dump(mode="json", exclude_defaults=True)

    @model_validator(mode="after")
    def _check(self) -> EvalCfg:
        if self.win_rate_vs != "reference" and self.win_rate_vs not in self.systems:
            raise ValueError(f"eval.win_rate_vs={self.win_rate_vs!r} must be 'reference' or one "
                             f"of eval.systems {self.systems}")
        return self


#: Sections each stage's artifacts depend on (see ``AlignXConfig.stage_hash``).
_STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "prepare": ("axes", "data"),
    "train": ("axes", "model", "data", "train", "seed"),
    "calibrate": ("axes", "model", "data", "router", "seed"),
    "baselines": ("axes", "model", "data", "train", "baselines", "seed"),
    "evaluate": ("axes", "model", "data", "train", "router", "baselines", "eval", "seed"),
}


class AlignXConfig(_Section):
    """The whole run: model, data, training (and, as they land, router/serve/eval)."""

    run_dir: str = Field("runs/default", description="Artifacts of this run (set with --run-dir).")
    storage: str | None = Field(
        None, description="Shared storage every node sees: a local/NFS path, file:///path, "
        "s3://bucket/prefix or gs://bucket/prefix (S3 endpoint: ?endpoint_override=host:port"
        "&scheme=http or AWS_ENDPOINT_URL_S3). The run and its Ray Train checkpoints live at "
        "<storage>/<run_dir name>; run_dir is each node's local working copy. Unset: run_dir only.",
    )
    axes: list[Axis] = Field(default_factory=lambda: list(AXES), description="Axes to train and route.")
    model: ModelCfg = ModelCfg()
    data: DataCfg = DataCfg()
    train: TrainCfg = TrainCfg()
    router: RouterCfg = RouterCfg()
    baselines: BaselinesCfg = BaselinesCfg()
    eval: EvalCfg = EvalCfg()
    seed: int = 0

    @field_validator("axes")
    @classmethod
    def _axes_unique(cls, v: list[Axis]) -> list[Axis]:
        if not v:
            raise ValueError("axes must name at least one axis")
        if len(set(v)) != len(v):
            raise ValueError(f"axes has duplicates: {[a.value for a in v]}")
        return v

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        from alignx.storage import check_storage

        return None if v is None else check_storage(v)

    @model_validator(mode="after")
    def _check(self) -> AlignXConfig:
        missing = [a.value for a in self.axes if a not in self.data.sources]
        if missing:
            raise ValueError(f"data.sources has no source for axes {missing}")
        if self.router.fallback not in self.axes:
            raise ValueError(f"router.fallback={self.router.fallback.value!r} is not one of axes")
        extra = [a.value for a in self.router.miss_cost if a not in self.axes]
        if extra:
            raise ValueError(f"router.miss_cost names {extra}, not among axes "
                             f"{[a.value for a in self.axes]}; drop them")
        if not self.train.multitask and "multitask" in self.eval.systems:
            raise ValueError("eval.systems includes 'multitask' but train.multitask=false: set "
                             "train.multitask=true or drop multitask from eval.systems")
        k = self.baselines.h3fusion.gate_top_k
        if k is not None and k > len(self.axes):
            raise ValueError(f"baselines.h3fusion.gate_top_k={k} exceeds the {len(self.axes)} axes "
                             "(experts); use at most that, or null for all")
        return self

    def config_hash(self) -> str:
        """Short hash of everything but ``run_dir``/``storage``: equal hashes mean equal runs."""
        d = self.model_dump(mode="json")
        d.pop("run_dir", None)
        d.pop("storage", None)  # where a run is kept does not change what it computes
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def stage_hash(self, stage: str) -> str:
        """Hash of the sections a stage's output depends on (a finished stage with the same
        hash is not redone by the pipeline)."""
        d = self.model_dump(mode="json")
        d["train"].pop("multitask", None)  # whether the baseline is trained changes no expert
        if d["router"].get("evaluation_sets", ()) is None:  # the default (every set) keeps the
            d["router"].pop("evaluation_sets")  # hash routers had before the key existed
        if d["router"].get("miss_cost", None) == {}:  # likewise
            d["router"].pop("miss_cost")
        if "finetune_anchor" in d["router"] and d["router"]["finetune_anchor"] is None:
            d["router"].pop("finetune_anchor")
        keep = {k: d.get(k) for k in _STAGE_SECTIONS[stage]}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _coerce(raw: str) -> Any:
    """Parse an override value with YAML rules: 3 -> int, true -> bool, [a,b] -> list."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to a nested dict (in place) and return it.

    Raises:
        AlignXConfigError: for an override without ``=`` or that walks into a non-mapping.
    """
    for item in overrides:
        if "=" not in item:
            raise AlignXConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = tree
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise AlignXConfigError(f"override {key!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = _coerce(raw)
    return tree


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (typo? see `alignx config --help` or jobs/configs/tiny.yaml)"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def validate_config(tree: dict[str, Any], source: str = "<config>") -> AlignXConfig:
    """Validate a config dict; raise :class:`AlignXConfigError` listing every problem."""
    try:
        return AlignXConfig.model_validate(tree)
    except ValidationError as err:
        raise AlignXConfigError(
            f"{source}: {err.error_count()} problem(s) in the configuration:\n{_format_errors(err)}"
        ) from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    run_dir: str | None = None,
) -> AlignXConfig:
    """Read a YAML config, apply overrides and ``run_dir``, validate.

    Args:
        path: a YAML file; ``None`` starts from the defaults.
        overrides: dotted ``key=value`` strings, applied in order.
        run_dir: if given, replaces ``run_dir``.

    Raises:
        AlignXConfigError: the file is missing, is not a YAML mapping, or fails validation.
    """
    tree: dict[str, Any] = {}
    src = "<defaults>"
    if path is not None:
        p = Path(path)
        src = str(p)
        if not p.is_file():
            raise AlignXConfigError(f"config file not found: {p} (shipped configs are in jobs/configs/)")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise AlignXConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise AlignXConfigError(f"{p}: the top level must be a mapping of sections")
        tree = loaded
    apply_overrides(tree, list(overrides or []))
    if run_dir is not None:
        tree["run_dir"] = str(run_dir)
    cfg = validate_config(tree, src)
    if path is not None:
        _warn_if_older(tree, cfg, src)
    # Ray workers run in another working directory: pin relative local paths here, on the driver.
    upd: dict[str, Any] = {"run_dir": _absolute(cfg.run_dir)}
    if cfg.storage is not None:
        upd["storage"] = _absolute(cfg.storage)
    if cfg.data.data_dir is not None:
        upd["data"] = cfg.data.model_copy(update={"data_dir": _absolute(cfg.data.data_dir)})
    return cfg.model_copy(update=upd)


def _missing_keys(tree: dict[str, Any], model: BaseModel, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value in ``model``) of every key of ``model`` (and of its sections) that
    ``tree`` does not set."""
    out = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        if name not in tree:
            out.append((prefix + name, value))
        elif isinstance(value, BaseModel) and isinstance(tree[name], dict):
            out += _missing_keys(tree[name], value, f"{prefix}{name}.")
    return out


def _warn_if_older(tree: dict[str, Any], cfg: AlignXConfig, src: str) -> None:
    """A resolved config (one that sets every top-level key, as every run directory's
    ``config.yaml`` does) that lacks a key was written before the key existed: today's default
    fills it in, which may not be what the run used. Say which keys, with the values taken."""
    if not set(type(cfg).model_fields) <= set(tree):
        return  # a hand-written config: defaults are the point
    missing = _missing_keys(tree, cfg)
    if missing:
        values = [f"{key}={json.dumps(v.model_dump(mode='json') if isinstance(v, BaseModel) else v, default=str)}"
                  for key, v in missing]
        many = len(missing) > 1
        logging.getLogger(__name__).warning(
            "%s was written before %s existed; today's %s in (%s). If the run used something "
            "else, pass it as an override.", src, "these keys" if many else "this key",
            "defaults fill them" if many else "default fills it", ", ".join(values))


def _absolute(path: str) -> str:
    """Absolute form of a local path; URIs (``s3://...``) are left alone."""
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())
