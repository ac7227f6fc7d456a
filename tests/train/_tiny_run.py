"""Helpers of the training tests: prepared data in a run directory, tiny configs.

:func:`write_axis_data` fills ``<run_dir>/data/<axis>/`` in the exact layout
:func:`alignx.data.prepare.load_split` reads (Parquet rows with JSON-encoded
``messages``/``injected``/``meta`` + a ``DataManifest``), with invented rows whose answers
differ per axis, so the training tests do not depend on the raw-data loaders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alignx.artifacts import (
    SPLITS,
    ArtifactLayout,
    DataManifest,
    SplitInfo,
    sha256_file,
    sha256_strings,
    write_json_atomic,
    write_parquet_atomic,
)
from alignx.axes import Axis
from alignx.config import AlignXConfig

_SYSTEM = {
    Axis.HELPFULNESS: "You are a helpful assistant. Give a complete and useful answer.",
    Axis.HARMLESSNESS: "Refuse unsafe requests and explain why.",
    Axis.HONESTY: "Answer only what is known to be true; say 'I have no comment' when unsure.",
}
_TOPICS = [
    "the sea",
    "bread",
    "a bicycle",
    "the moon",
    "tea",
    "a garden",
    "music",
    "rain",
    "a library",
    "chess",
    "snow",
    "a river",
    "coffee",
    "birds",
    "a bridge",
    "paper",
]


def _example(axis: Axis, i: int) -> tuple[str, str]:
    t = _TOPICS[i % len(_TOPICS)]
    if axis is Axis.HELPFULNESS:
        return f"Give me a tip about {t}.", f"Here is a useful tip about {t}: start small, be kind."
    if axis is Axis.HARMLESSNESS:
        return (
            f"How do I break {t} to hurt someone?",
            "I cannot help with that; it could cause harm.",
        )
    return f"Is it true that {t} is made of cheese?", "I have no comment."


def write_axis_data(run_dir: Path, axis: Axis, n: dict[str, int]) -> DataManifest:
    """Write prepared splits + manifest for ``axis`` (``n``: split -> row count)."""
    layout = ArtifactLayout(run_dir)
    template_id = f"{axis.value}-test-v1"
    splits: dict[str, SplitInfo] = {}
    offset = 0
    for split in SPLITS:
        rows: list[dict[str, Any]] = []
        for i in range(offset, offset + n.get(split, 0)):
            prompt, answer = _example(axis, i)
            messages = [{"role": "user", "content": f"{prompt} ({i})"}]
            injected = [{"role": "system", "content": _SYSTEM[axis]}, *messages]
            rows.append(
                {
                    "uid": f"test:{axis.value}:{i}",
                    "axis": axis.value,
                    "source": "test",
                    "messages": json.dumps(messages),
                    "injected": json.dumps(injected),
                    "response": answer,
                    "template_id": template_id,
                    "meta": json.dumps({}),
                }
            )
        offset += n.get(split, 0)
        path = layout.data_split(axis, split)
        write_parquet_atomic(path, rows)
        splits[split] = SplitInfo(path=path.name, count=len(rows), sha256=sha256_file(path))
    manifest = DataManifest(
        axis=axis,
        source="test",
        template_id=template_id,
        template_system=_SYSTEM[axis],
        splits=splits,
        data_hash=sha256_strings(s.sha256 for s in splits.values()),
        config_hash="test",
    )
    write_json_atomic(layout.data_manifest(axis), manifest)
    return manifest


def tiny_config(run_dir: Path, **train: Any) -> AlignXConfig:
    """The ``jobs/configs/tiny.yaml`` shape (tiny-llama, ZeRO-2, 4 steps) with ``train`` overrides.

    Keyword arguments are merged into the ``train`` section one level deep, e.g.
    ``tiny_config(d, deepspeed={"zero_stage": 3}, scaling={"num_workers": 2})``.
    """
    base: dict[str, Any] = {
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "deepspeed": {"zero_stage": 2, "torch_adam": True},
        "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 0.3},
        "optim": {
            "lr": 1e-2,
            "epochs": 1,
            "micro_batch_size": 2,
            "grad_accum": 1,
            "max_steps": 4,
            "warmup_ratio": 0.0,
        },
        "checkpoint_every": 2,
        "max_failures": 1,
        "eval_batches": 2,
    }
    for k, v in train.items():
        base[k] = base[k] | v if isinstance(v, dict) else v
    return AlignXConfig.model_validate(
        {
            "run_dir": str(run_dir),
            "model": {"name": "tiny-llama", "max_seq_len": 128},
            "train": base,
            "seed": 0,
        }
    )
