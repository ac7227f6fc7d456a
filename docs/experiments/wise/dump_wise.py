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

import pickle
import sys
from pathlib import Path

import numpy as np

import alignx.router.calibrate as C
from alignx.config import load_config
from alignx.pipeline import run_prepare
from alignx.router import mocae
from alignx.router.finetune import FinetuneResult, embed_with_state
from alignx.train.trainer import ensure_ray


def load_state(run: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(Path(run) / "router" / "encoder" / "model.safetensors"))


def interpolate(a: dict[str, np.ndarray], b: dict[str, np.ndarray],
                alpha: float) -> dict[str, np.ndarray]:
    """(1 - alpha) a + alpha b per tensor; integer tensors (position ids) must agree."""
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


if __name__ == "__main__":
    run_dir, out, run_a, run_b, alpha = sys.argv[1:6]
    alpha_f = float(alpha)
    cfg = load_config("jobs/configs/smollm2_cpu.yaml", sys.argv[6:], run_dir=run_dir)
    C.check_inputs = lambda cfg: None
    dump: dict[str, list] = {"fits": [], "evals": [], "wise": dict(a=run_a, b=run_b, alpha=alpha_f)}
    orig_fit = mocae.MoCaERouter.fit

    def fit(self, h_tr, y_tr, h_va, y_va, sample_weight=None):
        dump["fits"].append(dict(h_tr=h_tr, y_tr=np.asarray(y_tr), h_va=h_va,
                                 y_va=np.asarray(y_va), sw=sample_weight, config=self.config))
        return orig_fit(self, h_tr, y_tr, h_va, y_va, sample_weight=sample_weight)

    def run_finetune(cfg, blocks, *args, hidden_layer=None, **kwargs):
        state = interpolate(load_state(run_a), load_state(run_b), alpha_f)
        feats = embed_with_state(state, blocks, hidden_layer=hidden_layer,
                                 threads=max(1, int(cfg.router.finetune_cpus)))
        print(f"interpolated encoder: (1 - {alpha_f}) * {run_a} + {alpha_f} * {run_b}")
        return FinetuneResult(state=state, features=feats)

    mocae.MoCaERouter.fit = fit
    C.run_finetune = run_finetune
    ensure_ray()
    run_prepare(cfg)
    C.calibrate_router(cfg)
    with open(out, "wb") as f:
        pickle.dump(dump, f)
    print("dumped", len(dump["fits"]), "fits to", out)
