"""Benchmark: the base-model router encoder, length-sorted batches vs input order.

``router.encoder=base`` embeds every calibration prompt (~6k on the smollm2_cpu config) with the
base model; prompts of the three sources differ a lot in length, so a batch in input order pads
every prompt to its longest member. This measures both orders side by side, alternating, on the
same real prompts, and checks that they give the same features.

    ALIGNX_DATA_DIR=../shared/data python bench/base_encoder_batching.py --model smollm2-135m
    python bench/base_encoder_batching.py --model tiny-llama --texts 64    # no data needed

Threads: 1 torch thread by default, as each Ray Data embedding actor runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model registry name (default smollm2-135m)")
    p.add_argument("--texts", type=int, default=96, help="prompts per axis (train split)")
    p.add_argument("--batch-size", type=int, default=16, help="encoder batch size (default 16)")
    p.add_argument("--call-size", type=int, default=64,
                   help="texts per encode() call, as a Ray Data batch of the calibration job "
                   "(router.embed_batch_size, default 64)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per order")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return p.parse_args()


def _prompts(n: int) -> tuple[list[str], str]:
    """``n`` train prompts per axis from the real data, else a mix of synthetic lengths."""
    from alignx import envs
    from alignx.axes import AXES
    from alignx.config import DataCfg
    from alignx.data.prepare import subsample
    from alignx.data.sources import read_source
    from alignx.router.features import router_text

    data, data_dir = DataCfg(), envs.data_dir()
    if not data_dir:
        words = "please explain how the thing works in some detail".split()
        return [" ".join(words * (1 + (i * 7) % 23)) for i in range(3 * n)], "synthetic"
    texts: list[str] = []
    for axis in AXES:
        exs = subsample(read_source(data.sources[axis], axis, "train", data_dir, seed=0), n, 0)
        texts += [router_text(e.messages) for e in exs]
    return texts, f"real train prompts ({data_dir})"


def main() -> int:
    args = _args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    from alignx.config import ModelCfg
    from alignx.router.features import BaseModelEncoder

    torch.set_num_threads(args.threads)
    texts, where = _prompts(args.texts)
    sorted_enc = BaseModelEncoder(ModelCfg(name=args.model))
    plain = BaseModelEncoder(ModelCfg(name=args.model), model=sorted_enc.model,
                             tokenizer=sorted_enc.tok, length_sorted=False)
    lens = [len(x) for x in sorted_enc.tok(texts, add_special_tokens=False)["input_ids"]]
    print(f"{len(texts)} prompts, {where}; tokens min/median/max "
          f"{min(lens)}/{int(np.median(lens))}/{max(lens)}; {args.call_size} per call, batch "
          f"{args.batch_size}, {args.threads} thread(s)")
    sorted_enc.encode(texts[:4], args.batch_size)  # warm-up
    times: dict[str, list[float]] = {"input order": [], "length-sorted": []}
    feats = {}
    for _ in range(args.rounds):
        for name, enc in (("input order", plain), ("length-sorted", sorted_enc)):
            t0 = time.perf_counter()
            feats[name] = np.concatenate([
                enc.encode(texts[i : i + args.call_size], args.batch_size)
                for i in range(0, len(texts), args.call_size)])
            times[name].append(time.perf_counter() - t0)
    diff = float(np.abs(feats["input order"] - feats["length-sorted"]).max())
    base = min(times["input order"])
    for name, ts in times.items():
        best = min(ts)
        print(f"{name:14s} best {best:7.2f} s  ({len(texts) / best:6.1f} prompts/s)  "
              f"runs {', '.join(f'{t:.2f}' for t in ts)}  speed-up x{base / best:.2f}")
    print(f"max |feature difference| between the orders: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
