"""Benchmark, Stage 1 (train): tokens/s of the Ray Train + DeepSpeed loop vs plain PyTorch.

Both sides train the same LoRA adapter (same model, seed, data order, micro-batch, optimizer,
gradient clipping and torch thread count) on the same synthetic prepared split, in one run:

* ``plain``: a single-process loop (collate -> forward -> backward -> clip -> AdamW step, timed
  per step), run as a plain Ray task with the same CPUs, so it has the worker's process
  settings too (``OMP_NUM_THREADS``, Ray's worker niceness);
* ``ray+deepspeed``: ``alignx.train.trainer.train_axis`` with one Ray Train worker holding
  ``--threads`` CPUs and DeepSpeed (ZeRO from ``--zero``, torch AdamW); its per-step times come
  from the ``train_state.json`` history the loop records around the same work.

The plain loop runs before and after the Ray run (A-B-A) and its two results are averaged, so
a load change on a shared machine shows up as a gap between them. Steady-state throughput
excludes ``--warmup`` steps; the Ray side's fixed start-up cost (worker, model load, engine) is
printed separately. Target: ratio >= 0.8.

    python bench/train_throughput.py                # smollm2-135m, batch 4, 20 steps, 1 thread
    python bench/train_throughput.py --model tiny-llama --steps 40
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

for _k, _v in {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "DS_ACCELERATOR": "cpu",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

from alignx.artifacts import (  # noqa: E402
    SPLITS,
    ArtifactLayout,
    DataManifest,
    SplitInfo,
    sha256_file,
    write_json_atomic,
    write_parquet_atomic,
)
from alignx.axes import Axis  # noqa: E402
from alignx.config import AlignXConfig  # noqa: E402

log = logging.getLogger("bench.train_throughput")
AXIS = Axis.HELPFULNESS
WORDS = "the quick brown fox jumps over a lazy dog while seven birds sing in morning light".split()


def write_synthetic_split(
    run_dir: Path, n_train: int, prompt_words: int, answer_words: int
) -> None:
    """Prepared rows of one axis with fixed-length prompts and answers (equal-size batches)."""
    system = "You are a helpful assistant. Give a complete and useful answer."
    splits = {}
    for split, n in (("train", n_train), ("validation", 4), ("test", 0)):
        rows = []
        for i in range(n):
            prompt = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(prompt_words))
            answer = " ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(answer_words))
            msgs = [{"role": "user", "content": prompt}]
            rows.append(
                {
                    "uid": f"bench:{split}:{i}",
                    "axis": AXIS.value,
                    "source": "bench",
                    "messages": json.dumps(msgs),
                    "injected": json.dumps([{"role": "system", "content": system}, *msgs]),
                    "response": answer,
                    "template_id": "bench",
                    "meta": "{}",
                }
            )
        path = ArtifactLayout(run_dir).data_split(AXIS, split)
        write_parquet_atomic(path, rows)
        splits[split] = SplitInfo(path=path.name, count=len(rows), sha256=sha256_file(path))
    assert set(splits) == set(SPLITS)
    write_json_atomic(
        ArtifactLayout(run_dir).data_manifest(AXIS),
        DataManifest(
            axis=AXIS,
            source="bench",
            template_id="bench",
            template_system=system,
            splits=splits,
            data_hash="bench",
            config_hash="bench",
        ),
    )


def plain_loop(cfg_json: dict[str, Any], steps: int, warmup: int) -> dict[str, float]:
    """The single-process PyTorch reference: same model, LoRA init, data order and optimizer."""
    from peft import get_peft_model

    from alignx.data.prepare import load_split
    from alignx.data.tokenize import encode_rows
    from alignx.modeling import load_base
    from alignx.train.loop import collate_examples, epoch_order, micro_batch
    from alignx.train.lora import build_lora_config

    cfg = AlignXConfig.model_validate(cfg_json)
    torch.set_num_threads(cfg.train.threads_per_worker or 1)
    model, tok = load_base(cfg.model, use_gpu=False)
    torch.manual_seed(cfg.seed)
    model = get_peft_model(model, build_lora_config(cfg.train.lora, cfg.model.name))
    model.train()
    train = encode_rows(load_split(cfg.run_dir, AXIS, "train"), tok, cfg.model.max_seq_len)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = cfg.train.optim
    opt = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    order = epoch_order(len(train), cfg.seed, 0)
    tokens, seconds = 0, 0.0
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        batch = collate_examples(
            train, micro_batch(order, step, optim.micro_batch_size, 1, 0), tok.pad_token_id
        )
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.deepspeed.gradient_clipping)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if step >= warmup:
            tokens, seconds = tokens + int(batch["attention_mask"].sum()), seconds + dt
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def ray_loop(cfg: AlignXConfig, warmup: int) -> dict[str, float]:
    """One Ray Train worker with DeepSpeed: per-step times from the loop's own history."""
    from alignx.train.trainer import train_axis

    t0 = time.perf_counter()
    manifest = train_axis(cfg, AXIS)
    wall = time.perf_counter() - t0
    state = json.loads(
        (ArtifactLayout(cfg.run_dir).adapter_dir(AXIS) / "train_state.json").read_text()
    )
    timed = state["history"][warmup:]
    tokens = sum(h["tokens"] for h in timed)
    seconds = sum(h["seconds"] for h in timed)
    step_time = sum(h["seconds"] for h in state["history"])
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "wall": wall,
        "startup": wall - step_time,
        "steps": manifest.steps,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="registry name (tiny-llama is quick)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (and the Ray worker's CPUs); 1 on a shared 2-core box",
    )
    p.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--prompt-words", type=int, default=40)
    p.add_argument("--answer-words", type=int, default=40)
    p.add_argument("--run-dir", default=None, help="default: a temporary folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")

    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="alignx-bench-"))
    total = args.warmup + args.steps
    write_synthetic_split(run_dir, total * args.micro_batch, args.prompt_words, args.answer_words)
    cfg = AlignXConfig.model_validate(
        {
            "run_dir": str(run_dir),
            "axes": [AXIS.value],
            "model": {"name": args.model, "dtype": "float32", "max_seq_len": 512},
            "train": {
                "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
                "deepspeed": {"zero_stage": args.zero, "torch_adam": True},
                "scaling": {"num_workers": 1, "cpus_per_worker": float(args.threads)},
                "optim": {
                    "lr": 2e-4,
                    "micro_batch_size": args.micro_batch,
                    "max_steps": total,
                    "warmup_ratio": 0.0,
                },
                "checkpoint_every": total,
                "max_failures": 0,
                "eval_batches": 1,
                "threads_per_worker": args.threads,
            },
        }
    )

    import ray

    from alignx.envs import ray_runtime_env_vars

    repo = str(Path(__file__).resolve().parents[1])
    env = ray_runtime_env_vars() | {"PYTHONPATH": repo}
    results: dict[str, Any] = {}
    ray.init(
        address="local",
        num_cpus=max(2, args.threads),
        include_dashboard=False,
        runtime_env={"env_vars": env},
        log_to_driver=False,
    )
    try:
        plain = ray.remote(num_cpus=args.threads)(plain_loop)
        dumped = cfg.model_dump(mode="json")
        results["plain (before)"] = ray.get(plain.remote(dumped, args.steps, args.warmup))
        results["ray+deepspeed"] = ray_loop(cfg, args.warmup)
        results["plain (after)"] = ray.get(plain.remote(dumped, args.steps, args.warmup))
    finally:
        ray.shutdown()

    plain = (
        results["plain (before)"]["tokens_per_s"] + results["plain (after)"]["tokens_per_s"]
    ) / 2
    ours = results["ray+deepspeed"]["tokens_per_s"]
    print(
        f"\nmodel {args.model}, micro-batch {args.micro_batch}, {args.threads} threads, "
        f"ZeRO-{args.zero}, {args.steps} timed steps after {args.warmup} warmup\n"
    )
    print(f"{'loop':<16} {'tokens':>8} {'seconds':>8} {'tokens/s':>9}")
    for name, r in results.items():
        print(f"{name:<16} {r['tokens']:>8} {r['seconds']:>8.2f} {r['tokens_per_s']:>9.0f}")
    print(
        f"\nratio ray+deepspeed / plain (mean of before/after): {ours / plain:.2f} (target >= 0.80)"
    )
    r = results["ray+deepspeed"]
    print(
        f"ray+deepspeed fixed cost: {r['startup']:.1f} s of {r['wall']:.1f} s wall "
        "(workers, model load, engine, checkpoint, eval)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
