"""Stage 1 (prepare): raw source files -> per-axis Parquet splits + ``DataManifest``.

``prepare_axis(cfg, axis)`` reads the axis's source (``cfg.data.sources``) for
train/validation/test, checks that no conversation of a held-out split is also in train,
caps each split by deterministic seeded subsampling, injects the axis template, and writes
``<run_dir>/data/<axis>/{train,validation,test}.parquet`` and then, last, ``manifest.json``.

Parquet columns: ``uid, axis, source, messages`` (JSON of the raw conversation),
``injected`` (JSON of the conversation after :func:`~alignx.data.injection.inject`, equal to
``messages`` when ``data.inject`` is false), ``response, template_id, meta`` (JSON).

Re-running is cheap and idempotent: the rows are rebuilt and hashed, and when an existing
manifest has the same ``data_hash`` and its files still match their checksums nothing is
written.

Run it with ``alignx prepare --config jobs/configs/tiny.yaml --run-dir runs/tiny``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignx.artifacts import (
    SPLITS,
    ArtifactLayout,
    DataManifest,
    SplitInfo,
    read_manifest,
    read_parquet,
    sha256_file,
    sha256_strings,
    write_json_atomic,
    write_parquet_atomic,
)
from alignx.axes import Axis
from alignx.config import AlignXConfig
from alignx.data.injection import inject
from alignx.data.schema import Example
from alignx.data.sources import DataFormatError, Loc, read_source, source_location
from alignx.data.templates import NO_TEMPLATE_ID, PromptTemplate, default_template

log = logging.getLogger(__name__)

#: Bump when the row layout or the row-building rules change (part of ``data_hash``).
PREPARE_VERSION = "1"

COLUMNS: tuple[str, ...] = (
    "uid",
    "axis",
    "source",
    "messages",
    "injected",
    "response",
    "template_id",
    "meta",
)
_JSON_COLUMNS = ("messages", "injected", "meta")


class DataLeakError(DataFormatError):
    """A held-out conversation also appears in the training split (names the train file)."""


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)


def _conv_key(ex: Example) -> str:
    """Whitespace- and case-normalised conversation, to find the same prompt across splits."""
    return _dumps([[m["role"], " ".join(m["content"].lower().split())] for m in ex.messages])


def check_no_leak(
    splits: dict[str, list[Example]], axis: Axis, files: dict[str, str] | None = None
) -> dict[str, list[Example]]:
    """Make sure no validation/test conversation is also a training (or validation) one.

    For honesty (TruthfulQA) any overlap is an error: test questions must never be trained
    on. For the other axes, overlapping rows are removed from train (and from validation,
    where they overlap with test), with a warning naming the count.

    Args:
        splits: ``{"train": [...], "validation": [...], "test": [...]}``.
        axis: the axis (decides error vs. removal).
        files: split -> source file, named in the error.

    Returns:
        The splits with overlapping rows removed from the earlier split.

    Raises:
        DataLeakError: an overlap on the honesty axis (names a few uids).
    """
    out = dict(splits)
    order = [s for s in SPLITS if s in splits]
    for i, held in enumerate(order[1:], 1):
        held_keys = {_conv_key(e) for e in splits[held]}
        for earlier in order[:i]:
            bad = [e for e in out[earlier] if _conv_key(e) in held_keys]
            if not bad:
                continue
            sample = ", ".join(e.uid for e in bad[:3])
            if axis == Axis.HONESTY:
                raise DataLeakError(
                    Loc((files or {}).get(earlier, f"axis {axis.value}, split {earlier}")),
                    None,
                    f"{len(bad)} {earlier} question(s) of axis honesty also appear in {held} "
                    f"(e.g. {sample}); TruthfulQA {held} questions must never be trained on — "
                    "check that the split files come from one split of the benchmark",
                )
            log.warning(
                "%s: dropping %d %s row(s) whose conversation is also in %s (e.g. %s)",
                axis.value,
                len(bad),
                earlier,
                held,
                sample,
            )
            drop = {id(e) for e in bad}
            out[earlier] = [e for e in out[earlier] if id(e) not in drop]
    return out


def subsample(examples: Sequence[Example], limit: int | None, seed: int) -> list[Example]:
    """Keep at most ``limit`` examples, chosen by seeded hash of their uid.

    The choice does not depend on input order, and a smaller limit selects a subset of a
    larger one. Kept examples stay in input order.

    Args:
        examples: the examples.
        limit: the cap (``None``: keep all).
        seed: the subsampling seed (``cfg.data.seed``).

    Returns:
        The kept examples.
    """
    if limit is None or len(examples) <= limit:
        return list(examples)
    ranked = sorted(examples, key=lambda e: hashlib.sha256(f"{seed}:{e.uid}".encode()).hexdigest())
    keep = {id(e) for e in ranked[:limit]}
    return [e for e in examples if id(e) in keep]


def build_row(ex: Example, template: PromptTemplate | None) -> dict[str, Any]:
    """One Parquet row of an example.

    Args:
        ex: the example.
        template: the axis template, or ``None`` for no injection.

    Returns:
        A flat dict with the :data:`COLUMNS`.
    """
    messages = [dict(m) for m in ex.messages]
    injected = inject(messages, template) if template is not None else messages
    return {
        "uid": ex.uid,
        "axis": ex.axis.value,
        "source": ex.source,
        "messages": _dumps(messages),
        "injected": _dumps(injected),
        "response": ex.response,
        "template_id": template.id if template is not None else NO_TEMPLATE_ID,
        "meta": _dumps(ex.meta),
    }


def _data_hash(rows: dict[str, list[dict[str, Any]]], template_system: str) -> str:
    def parts():
        yield f"prepare-v{PREPARE_VERSION}"
        yield template_system
        for split in SPLITS:
            yield f"split:{split}"
            for r in rows[split]:
                yield _dumps(r)

    return sha256_strings(parts())


def _up_to_date(layout: ArtifactLayout, axis: Axis, data_hash: str) -> DataManifest | None:
    path = layout.data_manifest(axis)
    if not path.is_file():
        return None
    try:
        old = read_manifest(path, DataManifest)
    except ValueError:
        return None
    if old.data_hash != data_hash or set(old.splits) != set(SPLITS):
        return None
    for info in old.splits.values():
        p = path.parent / info.path
        if not p.is_file() or sha256_file(p) != info.sha256:
            return None
    return old


def prepare_axis(cfg: AlignXConfig, axis: Axis, force: bool = False) -> DataManifest:
    """Prepare one axis's train/validation/test splits and write its manifest.

    Args:
        cfg: the run config (``cfg.data``, ``cfg.run_dir``).
        axis: the axis to prepare.
        force: rewrite even when an identical prepared copy exists.

    Returns:
        The axis's :class:`~alignx.artifacts.DataManifest` (the existing one when nothing
        changed).

    Raises:
        AlignXConfigError: no data directory configured.
        DataFormatError: malformed raw data (names file, line and field); its subclasses
            ``DataLeakError`` (a TruthfulQA held-out question also in train) and
            ``SourceNotFoundError`` (a missing split file).
    """
    d = cfg.data
    source = d.sources[axis]
    data_dir = Path(d.data_dir) if d.data_dir is not None else None
    template = default_template(axis)
    t0 = time.perf_counter()
    log.info(
        "prepare %s: source %s (%s)",
        axis.value,
        source,
        "hub" if d.from_hub else (data_dir or "$ALIGNX_DATA_DIR"),
    )

    raw = {
        s: read_source(source, axis, s, data_dir, from_hub=d.from_hub, seed=d.seed) for s in SPLITS
    }
    files = {s: source_location(source, s, data_dir, d.from_hub) for s in SPLITS}
    raw = check_no_leak(raw, axis, files)
    caps = {
        "train": d.max_train_per_axis,
        "validation": d.max_eval_per_axis,
        "test": d.max_eval_per_axis,
    }
    chosen = {s: subsample(raw[s], caps[s], d.seed) for s in SPLITS}
    for s in SPLITS:
        if not chosen[s]:
            raise DataFormatError(
                Loc(files[s]),
                None,
                f"axis {axis.value}: split {s} is empty "
                "after removing rows that also appear in a held-out split",
            )
    used = template if d.inject else None
    rows = {s: [build_row(e, used) for e in chosen[s]] for s in SPLITS}
    data_hash = _data_hash(rows, used.system if used else "")

    layout = ArtifactLayout(cfg.run_dir)
    if not force:
        old = _up_to_date(layout, axis, data_hash)
        if old is not None:
            log.info(
                "prepare %s: up to date (%s), nothing written", axis.value, layout.data_dir(axis)
            )
            return old

    layout.data_manifest(axis).unlink(missing_ok=True)  # a folder without manifest = unfinished
    splits: dict[str, SplitInfo] = {}
    for s in SPLITS:
        path = write_parquet_atomic(layout.data_split(axis, s), rows[s])
        splits[s] = SplitInfo(path=path.name, count=len(rows[s]), sha256=sha256_file(path))
    manifest = DataManifest(
        axis=axis,
        source=source,
        source_files=files,
        template_id=used.id if used else NO_TEMPLATE_ID,
        template_system=used.system if used else "",
        splits=splits,
        data_hash=data_hash,
        config_hash=cfg.config_hash(),
    )
    write_json_atomic(layout.data_manifest(axis), manifest)
    log.info(
        "prepare %s: train %d / validation %d / test %d rows -> %s (%.1fs)",
        axis.value,
        splits["train"].count,
        splits["validation"].count,
        splits["test"].count,
        layout.data_dir(axis),
        time.perf_counter() - t0,
    )
    return manifest


def prepare_all(cfg: AlignXConfig, force: bool = False) -> dict[Axis, DataManifest]:
    """Prepare every axis of ``cfg.axes``.

    With ``storage`` set, each axis's data is fetched from shared storage first (so an
    identical copy is not rewritten) and published there when prepared.

    Args:
        cfg: the run config.
        force: rewrite even when up to date.

    Returns:
        ``{axis: manifest}`` in ``cfg.axes`` order.
    """
    from alignx.storage import fetch, publish

    out: dict[Axis, DataManifest] = {}
    layout = ArtifactLayout(cfg.run_dir)
    for axis in cfg.axes:
        fetch(cfg, layout.data_dir(axis))  # a copy on shared storage is checked, not rebuilt
        out[axis] = prepare_axis(cfg, axis, force=force)
        publish(cfg, layout.data_dir(axis))  # no-op without storage or when already there
    return out


def load_split(run_dir: str | Path, axis: Axis, split: str) -> list[dict[str, Any]]:
    """Read one prepared split, with ``messages``/``injected``/``meta`` decoded.

    Args:
        run_dir: the run directory.
        axis: the axis.
        split: ``train``, ``validation`` or ``test``.

    Returns:
        One dict per row with the :data:`COLUMNS` (JSON columns as Python objects).

    Raises:
        ArtifactNotFoundError: the axis has not been prepared (names the command).
        ValueError: an unknown split or a file without the expected columns.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    layout = ArtifactLayout(run_dir)
    manifest = layout.load_data_manifest(axis)  # raises with the `alignx prepare` hint
    path = layout.data_dir(axis) / manifest.splits[split].path
    rows = read_parquet(path)
    if rows and set(COLUMNS) - set(rows[0]):
        raise ValueError(
            f"{path}: missing columns {sorted(set(COLUMNS) - set(rows[0]))}; rerun `alignx prepare`"
        )
    for r in rows:
        for c in _JSON_COLUMNS:
            r[c] = json.loads(r[c])
    return rows
