"""Calibrate a router on an interpolated encoder (WiSE-FT style) and dump its MoCaE fits.

docs/experiments/wise_protocol.md. Like ``dump_calibration.py``, but the encoder fine-tune is
replaced by the weight-space interpolation of two fine-tuned encoders already saved in run
directories (``<run>/router/encoder/model.safetensors``):

    state = (1 - alpha) * A + alpha * B        (per tensor; both fine-tuned from MiniLM)

Every other step of the calibration job runs as in ``alignx calibrate`` (targets, MoCaE fit
and its choices on validation, calibrators, report, saved encoder), so the router written to
RUN_DIR is served and scored like any other.

    ALIGNX_DATA_DIR=../shared/data python docs/experiments/wise/dump_wise.py \\
        RUN_DIR OUT.pkl A_RUN B_RUN ALPHA seed=0 [config overrides]
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np

import alignx.router.calibrate as C
from alignx.router.finetune import FinetuneResult, embed_with_state
from alignx.router.finetune import interpolate_states as interpolate

_spec = importlib.util.spec_from_file_location(
    "dump_calibration", Path(__file__).resolve().parent.parent / "dump_calibration.py")
DC = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(DC)


def load_state(run: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(Path(run) / "router" / "encoder" / "model.safetensors"))


if __name__ == "__main__":
    run_dir, out, run_a, run_b, alpha = sys.argv[1:6]
    alpha_f = float(alpha)
    cfg = DC.load_run_config(run_dir, sys.argv[6:])
    dump = DC.install_dump()
    dump["wise"] = dict(a=run_a, b=run_b, alpha=alpha_f)

    def run_finetune(cfg, blocks, *args, hidden_layer=None, **kwargs):
        state = interpolate(load_state(run_a), load_state(run_b), alpha_f)
        feats = embed_with_state(state, blocks, hidden_layer=hidden_layer,
                                 threads=max(1, int(cfg.router.finetune_cpus)))
        print(f"interpolated encoder: (1 - {alpha_f}) * {run_a} + {alpha_f} * {run_b}")
        return FinetuneResult(state=state, features=feats)

    C.run_finetune = run_finetune
    DC.calibrate_and_dump(cfg, out, dump)
