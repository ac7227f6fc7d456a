"""Calibrate a router on the uniform average ("soup") of several runs' fine-tuned encoders
(docs/experiments/seed_soup_protocol.md).

Each member is a finished calibration run of today's default with its own ``seed``. The soup's
weights replace the fine-tune: the job embeds every block with them and fits the router and its
calibrators exactly as after a fine-tune (targets, seeds, calibration prompts and every other
step are the default's), then saves the soup's weights as the router's encoder, so the served
router is the soup.

    ALIGNX_DATA_DIR=../shared/data python docs/experiments/seed_soup/run_soup.py \\
        RUN_DIR MEMBER_RUN_DIR... -- seed=0 [overrides]
"""
import sys
import time
from pathlib import Path

import numpy as np

import alignx.router.calibrate as C
from alignx.config import load_config
from alignx.pipeline import run_prepare
from alignx.router.features import FINETUNED_WEIGHTS, SentenceEncoder, router_features
from alignx.router.finetune import FinetuneResult, average_states
from alignx.train.trainer import ensure_ray


def soup_state(members: list[Path]) -> dict[str, np.ndarray]:
    """The uniform average of the members' saved encoder weights."""
    from safetensors.numpy import load_file

    return average_states([load_file(str(m / "router" / FINETUNED_WEIGHTS)) for m in members])


def main(argv: list[str]) -> None:
    cut = argv.index("--") if "--" in argv else len(argv)
    run_dir, members, overrides = argv[0], [Path(m) for m in argv[1:cut]], argv[cut + 1 :]
    if len(members) < 2:
        raise SystemExit("name at least two member run directories")
    state = soup_state(members)

    def run_finetune(cfg, blocks, t_tr, t_va, seed_texts, seed_y, use_seeds, monitor=None,
                     hidden_layer=None, **kwargs):
        import torch

        t0 = time.time()
        enc = SentenceEncoder()
        enc.model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
        enc.model.eval()
        features = [router_features(enc, list(b), hidden_layer) for b in blocks]
        return FinetuneResult(state=state, features=features, seconds=time.time() - t0,
                              selected_on=("soup of " + ", ".join(map(str, members)),))

    cfg = load_config("jobs/configs/smollm2_cpu.yaml", overrides, run_dir=run_dir)
    C.check_inputs = lambda cfg: None  # features never need the adapters
    C.run_finetune = run_finetune
    ensure_ray()
    run_prepare(cfg)
    report = C.calibrate_router(cfg)
    print(C.format_report(report))


if __name__ == "__main__":
    main(sys.argv[1:])
