"""Benchmark: latency per request and peak memory of AlignX and its baselines (METHOD.md).

Each system (``alignx``, ``alignx-softmax``, ``base``, ``multitask``, ``h3fusion``, or
``expert-<axis>``) runs in its own fresh process on the same test prompts with the same
``max_tokens``; see :mod:`alignx.baselines.cost` for exactly what is measured. The paper
claims over 35% less latency and memory than prior MoEs (H3Fusion); the output says whether
this run reaches it.

    python bench/systems_cost.py --run-dir runs/smollm2 --out runs/smollm2/systems_cost.json
    python bench/systems_cost.py --run-dir runs/tiny --systems base,h3fusion --prompts 2 --max-tokens 8

``h3fusion`` needs trained gates in the run (``alignx pipeline`` trains them, or
``alignx.baselines.h3fusion.train_h3fusion``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    from alignx.artifacts import ArtifactNotFoundError, write_json_atomic
    from alignx.baselines.cost import COST_SYSTEMS, format_costs, measure_costs
    from alignx.config import AlignXConfigError, load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True, help="a trained run directory")
    ap.add_argument("--config", help="experiment YAML (default: the run's config.yaml)")
    ap.add_argument("--systems", default=",".join(COST_SYSTEMS),
                    help=f"comma-separated systems (default: {','.join(COST_SYSTEMS)})")
    ap.add_argument("--prompts", type=int, default=8, help="test prompts per system")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repetitions")
    ap.add_argument("--out", help="write the result JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run = Path(args.run_dir)
    try:
        cfg = load_config(args.config or run / "config.yaml", run_dir=str(run))
    except AlignXConfigError as e:
        print(f"error: {e} (pass --config)", file=sys.stderr)
        return 2
    if args.prompts < 1 or args.max_tokens < 1 or args.threads < 1:
        print("error: --prompts, --max-tokens and --threads must be >= 1", file=sys.stderr)
        return 2
    try:
        res = measure_costs(cfg.run_dir, cfg.model, [s.strip() for s in args.systems.split(",")
                                                      if s.strip()],
                            n_prompts=args.prompts, axes=cfg.axes, max_tokens=args.max_tokens,
                            threads=args.threads, rounds=args.rounds)
    except (ValueError, RuntimeError, ArtifactNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_costs(res))
    if args.out:
        write_json_atomic(args.out, res)
        print(f"wrote {args.out}")
    else:
        print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
