"""Probe for a next candidate (nothing is chosen from it): does the encoder fine-tune overfit
the writers it learns from? Runs the calibration job on RUN_DIR with the shipped defaults, the
fine-tune evaluated 8 times per epoch instead of 2, and two monitored sets recorded at every
point (they never choose the step): the calibration prompts (``intent_set_3``) and the retired
fourth set (``intent_set_4``, which the shipped seeds do not include). Prints the curve:
balanced NLL and accuracy of the fine-tune's own head on validation and on both sets.

    ALIGNX_DATA_DIR=../shared/data python docs/experiments/seeds_4/finetune_curve_probe.py RUN_DIR [key=value ...]
"""

import functools
import json
import sys

import alignx.router.calibrate as C
from alignx.config import load_config
from alignx.pipeline import run_prepare
from alignx.router.calibrate import _shipped_set
from alignx.train.trainer import ensure_ray

if len(sys.argv) < 2:
    sys.exit(__doc__)
cfg = load_config("jobs/configs/smollm2_cpu.yaml", sys.argv[2:], run_dir=sys.argv[1])
C.check_inputs = lambda cfg: None  # features never need the adapters (dump_calibration.py)
curves = []
run_finetune = C.run_finetune


def probed(*args, monitor=None, **kwargs):
    sets = {**(monitor or {}), "intent_set_4": _shipped_set("intent_set_4.jsonl", list(cfg.axes))}
    res = run_finetune(*args, monitor=sets, evals_per_epoch=8, **kwargs)
    curves.append(res.curve)
    return res


C.run_finetune = functools.wraps(run_finetune)(probed)
ensure_ray()
run_prepare(cfg)
C.calibrate_router(cfg)
names = ("val", "calibration", "intent_set_4")
print("step  " + "  ".join(f"{n + ' NLL / bal. acc':>28}" for n in names))
for p in curves[0]:
    print(f"{p['step']:>4}  " + "  ".join(
        f"{p[n + '_nll']:>17.4f} / {p[n + '_balanced_acc']:.3f}" for n in names))
with open(f"{cfg.run_dir}/finetune_curve.json", "w") as f:
    json.dump(curves[0], f, indent=1)
