"""Run the calibration job on a run directory and dump the inputs of every MoCaE fit.

Used by the experiments in this folder. Features never need the adapters, so the adapter check
of ``alignx calibrate`` is skipped and no training is needed; the data are prepared first. The
dump holds, per ``MoCaERouter.fit`` call, the training and validation features and targets
(all the CV scripts read), and per ``MoCaERouter.evaluate`` call the features and labels it
scored (test split, intent set; read only by ``pool_temperature_readout.py``, after a decision).

    ALIGNX_DATA_DIR=../shared/data python docs/experiments/dump_calibration.py RUN_DIR OUT.pkl seed=3

The job still writes ``RUN_DIR/router/router_report.json`` with the test rows.
"""

import pickle
import sys

import numpy as np

import alignx.router.calibrate as C
from alignx.config import load_config
from alignx.pipeline import run_prepare
from alignx.router import mocae
from alignx.train.trainer import ensure_ray


def install_dump() -> dict[str, list]:
    """Patch ``MoCaERouter.fit`` / ``evaluate`` to record their inputs; returns the record."""
    dump: dict[str, list] = {"fits": [], "evals": []}
    orig_fit, orig_eval = mocae.MoCaERouter.fit, mocae.MoCaERouter.evaluate

    def fit(self, h_tr, y_tr, h_va, y_va, sample_weight=None):
        dump["fits"].append(dict(h_tr=h_tr, y_tr=np.asarray(y_tr), h_va=h_va,
                                 y_va=np.asarray(y_va), sw=sample_weight, config=self.config))
        return orig_fit(self, h_tr, y_tr, h_va, y_va, sample_weight=sample_weight)

    def evaluate(self, h, y, *args, **kwargs):
        dump["evals"].append(dict(h=h, y=np.asarray(y), router=id(self)))
        return orig_eval(self, h, y, *args, **kwargs)

    mocae.MoCaERouter.fit, mocae.MoCaERouter.evaluate = fit, evaluate
    return dump


def calibrate_and_dump(cfg, out: str, dump: dict) -> None:
    """Prepare the data, run the calibration job without its adapter check, pickle ``dump``."""
    C.check_inputs = lambda cfg: None
    ensure_ray()
    run_prepare(cfg)
    C.calibrate_router(cfg)
    with open(out, "wb") as f:
        pickle.dump(dump, f)
    print("dumped", len(dump["fits"]), "fits to", out)


def load_run_config(run_dir: str, overrides: list[str]):
    """The embedded default's config (``jobs/configs/smollm2_cpu.yaml``) with ``overrides``."""
    return load_config("jobs/configs/smollm2_cpu.yaml", overrides, run_dir=run_dir)


if __name__ == "__main__":
    dump = install_dump()
    calibrate_and_dump(load_run_config(sys.argv[1], sys.argv[3:]), sys.argv[2], dump)
