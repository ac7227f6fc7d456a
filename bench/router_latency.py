"""Benchmark: MoCaE routing latency and throughput on CPU (issue: Stage 2).

Measures, in one run:
  * per-request routing latency (p50/p99) on one feature vector: the run's router as served
    (MoCaE + its OOD detector), or ``MoCaERouter.predict`` on the synthetic router,
  * per-request latency including feature extraction (all-MiniLM-L6-v2 on one prompt),
  * batched throughput (requests/s) of routing alone and of encoder + routing.

    python bench/router_latency.py --run-dir runs/smollm2          # the run's calibrated router
    python bench/router_latency.py                                 # a router fitted on real-sized
                                                                   # synthetic clusters (no run needed)

Threads: BLAS/torch threads are set before numpy loads (default 1, as the serving router runs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", help="use <run-dir>/router (else a synthetic router)")
    p.add_argument("--threads", type=int, default=1, help="BLAS / torch threads (default 1)")
    p.add_argument("--requests", type=int, default=500, help="single-request repetitions")
    p.add_argument("--batch", type=int, default=256, help="batch size of the throughput runs")
    p.add_argument("--no-encoder", action="store_true", help="skip the sentence-encoder rows")
    return p.parse_args()


def main() -> int:
    args = _args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from alignx.axes import AXES
    from alignx.router.mocae import MoCaEConfig, MoCaERouter

    rng = np.random.default_rng(0)
    if args.run_dir:
        from alignx.router.serving import load

        calibrated = load(args.run_dir)
        router = calibrated.router
        # the served path: MoCaE + the hidden-state OOD detector, on h(x) + the layer's state
        d = router.mean.shape[0] + (calibrated.ood.dim if calibrated.ood is not None else 0)
        predict = calibrated.route
        source = (f"{args.run_dir}/router (OOD flag: "
                  f"{'hidden layer ' + str(calibrated.hidden_layer) if calibrated.ood else 'fractal'})")
    else:  # 3 axes x 2000 train + 3 x 300 val points in 384-d, like the MiniLM calibration set
        d = 384
        centers = rng.normal(size=(3, d))
        def cloud(n):  # noqa: E306
            y = rng.integers(0, 3, n)
            h = centers[y] + 2.0 * rng.normal(size=(n, d))
            return (h / np.linalg.norm(h, axis=1, keepdims=True)).astype(np.float32), y
        h_tr, y_tr = cloud(6000)
        h_va, y_va = cloud(900)
        router = MoCaERouter(MoCaEConfig(fractal_mode="knn"), axes=AXES).fit(h_tr, y_tr, h_va, y_va)
        predict = router.predict
        source = "synthetic 3-axis clouds (6000 train, 384-d)"
    codes = int(router.fractal.centroids.shape[0])
    h1 = rng.normal(size=(1, d)).astype(np.float32)
    hb = rng.normal(size=(args.batch, d)).astype(np.float32)

    def timed(fn, n):
        for _ in range(min(20, n)):
            fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return np.array(ts) * 1e3  # ms

    rows = []
    t = timed(lambda: predict(h1), args.requests)
    rows.append(("route 1 request (features given)", np.median(t), np.percentile(t, 99), 1e3 / t.mean()))
    t = timed(lambda: predict(hb), max(10, args.requests // 20))
    rows.append((f"route batch of {args.batch}", np.median(t), np.percentile(t, 99),
                 args.batch * 1e3 / t.mean()))
    if not args.no_encoder:
        from alignx.router.features import SentenceEncoder

        # a run's router brings its own encoder (fine-tuned weights included)
        if args.run_dir:
            from alignx.config import load_config

            model_cfg = load_config(Path(args.run_dir) / "router" / "config.yaml").model
            encode = calibrated.features(calibrated.build_encoder(model_cfg))
        else:
            encode = SentenceEncoder().encode
        prompt = ["How do I get a refund for an order that arrived damaged?"]
        t = timed(lambda: predict(encode(prompt)), max(20, args.requests // 5))
        rows.append(("encode + route 1 request", np.median(t), np.percentile(t, 99), 1e3 / t.mean()))
        texts = prompt * args.batch
        t = timed(lambda: predict(encode(texts)), 5)
        rows.append((f"encode + route batch of {args.batch}", np.median(t), np.percentile(t, 99),
                     args.batch * 1e3 / t.mean()))

    print(f"router: {source}; {codes} fractal centroids; threads={args.threads}; "
          f"{os.cpu_count()} CPUs")
    print(f"{'measurement':<36}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>12}")
    for name, p50, p99, rps in rows:
        print(f"{name:<36}{p50:>10.3f}{p99:>10.3f}{rps:>12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
