"""The three arms of ``finetune_select_protocol.md`` from one fine-tune.

Runs the encoder fine-tune of the ``smollm2_cpu`` calibration job once, evaluated at the union of
the shipped schedule (2 points per epoch) and 8 points per epoch, with every state kept and the
fourth set monitored (recorded, never chosen on). Evaluation draws no random numbers, so this is
the trajectory of each arm. Then it runs the rest of the calibration job once per arm, on that
arm's weights, into its own run directory with that arm's config:

- ``ROOT/B``: the shipped rule (validation NLL at 2 points per epoch);
- ``ROOT/S``: ``router.finetune_evals_per_epoch=8 router.finetune_select=validation+calibration``;
- ``ROOT/W``: ``router.finetune_evals_per_epoch=8 router.finetune_average_from=0.5``.

Each arm's choice is recomputed here from the kept states with the library's own
``selection_score`` and ``average_states``; ``tests/router/test_finetune.py`` checks that
``finetune_sentence_encoder`` given an arm's options returns exactly that choice. Features never need the
adapters, so the adapter check is skipped (as in ``dump_calibration.py``). The embedding pass
of the frozen encoder is shared by the three jobs. The curve goes to ``ROOT/curve.json``.

    ALIGNX_DATA_DIR=../shared/data python docs/experiments/finetune_select/run_arms.py ROOT seed=1
"""

import json
import sys
import tempfile
from pathlib import Path

import alignx.router.calibrate as C
from alignx.config import load_config
from alignx.pipeline import run_prepare
from alignx.router.calibrate import _shipped_set, save_encoder_weights
from alignx.router.features import SentenceEncoder
from alignx.router.finetune import (
    FinetuneResult,
    average_states,
    evaluation_schedule,
    selection_score,
)
from alignx.train.trainer import ensure_ray

ARMS = {"B": [],
        "S": ["router.finetune_evals_per_epoch=8", "router.finetune_select=validation+calibration"],
        "W": ["router.finetune_evals_per_epoch=8", "router.finetune_average_from=0.5"]}

if len(sys.argv) < 2:
    sys.exit(__doc__)
root, overrides = Path(sys.argv[1]), sys.argv[2:]
cfgs = {arm: load_config("jobs/configs/smollm2_cpu.yaml", overrides + extra, run_dir=root / arm)
        for arm, extra in ARMS.items()}
C.check_inputs = lambda cfg: None

embed_texts, embedded = C.embed_texts, {}


def shared_embed(cfg, texts, sizes):
    """The frozen encoder's pass, once for the three jobs (their inputs are identical)."""
    key = (cfg.router.encoder, tuple(texts), tuple(sizes))
    if key not in embedded:
        embedded[key] = embed_texts(cfg, texts, sizes)
    return embedded[key]


C.embed_texts = shared_embed
run_finetune, trajectory, arm_now = C.run_finetune, {}, {"arm": None}


def arm_result(cfg, blocks, t_tr, t_va, seed_texts, seed_y, use_seeds, monitor=None):
    """The fine-tune (once), then the current arm's weights and features."""
    if not trajectory:
        rc = cfg.router
        n = len(blocks[0]) + len(seed_texts) * (rc.finetune_seed_repeats if use_seeds else 0)
        _, total, shipped = evaluation_schedule(n, rc.finetune_batch_size,
                                                rc.epochs_to_finetune, 2)
        _, _, dense = evaluation_schedule(n, rc.finetune_batch_size, rc.epochs_to_finetune, 8)
        watched = {**(monitor or {}),
                   "intent_set_4": _shipped_set("intent_set_4.jsonl", list(cfg.axes))}
        res = run_finetune(cfg, blocks, t_tr, t_va, seed_texts, seed_y, use_seeds,
                           monitor=watched, evals_per_epoch=8, extra_eval_steps=set(shipped),
                           keep_states=True, select_on=("val",), average_from=None)
        curve = {p["step"]: p for p in res.curve}
        b = min(shipped, key=lambda s: selection_score(curve[s], ("val",)))
        s = min(dense, key=lambda s: selection_score(curve[s], ("val", "calibration")))
        tail = [s for s in dense if s >= 0.5 * total]
        trajectory.update(res=res, total=total, choice={
            "B": (res.states[b], b, ("val",), []),
            "S": (res.states[s], s, ("val", "calibration"), []),
            "W": (average_states([res.states[s] for s in tail]), tail[-1], ("val",), tail)})
        root.mkdir(parents=True, exist_ok=True)
        (root / "curve.json").write_text(json.dumps(
            {"total": total, "shipped_points": shipped, "dense_points": dense,
             "chosen": {a: {"step": c[1], "averaged_steps": c[3]}
                        for a, c in trajectory["choice"].items()},
             "curve": res.curve}, indent=1))
    res, (state, step, on, avg) = trajectory["res"], trajectory["choice"][arm_now["arm"]]
    with tempfile.TemporaryDirectory() as tmp:
        enc = SentenceEncoder(weights=save_encoder_weights(state, Path(tmp) / "w.safetensors"))
        features = [enc.encode(list(block)) for block in blocks]
    return FinetuneResult(state=state, features=features, curve=res.curve, best_step=step,
                          steps=trajectory["total"], seconds=res.seconds, selected_on=on,
                          averaged_steps=avg)


C.run_finetune = arm_result
ensure_ray()
for arm, cfg in cfgs.items():
    arm_now["arm"] = arm
    run_prepare(cfg)
    C.calibrate_router(cfg)
    print(f"arm {arm}: {cfg.run_dir}/router", flush=True)
c = trajectory["choice"]
print("chosen:", {a: (v[1], v[3]) for a, v in c.items()})
