"""Where every artifact of a run lives, and the manifests stages hand to each other.

All artifact paths come from :class:`ArtifactLayout`; all artifact writes go through the
``write_*_atomic`` helpers here (temp file + ``os.replace``), so a crash never leaves a
half-written file under a final name, and a stage writes its manifest *last*: a directory
without a manifest is not a finished artifact. Keeping the I/O in this one module is what
lets storage URIs slot in later without touching the stages.

Layout of ``<run_dir>``::

    config.yaml                       resolved config of the last command run here
    data/<axis>/{train,validation,test}.parquet + manifest.json
    adapters/<axis>/                  PEFT adapter + manifest.json   (adapters/multitask/ too)
    baselines/h3fusion/               token-level MoE gates (safetensors) + manifest.json
    ray_train/                        Ray Train storage (checkpoints, per-axis run folders)
    stage1_report.json                held-out losses + task-vector cosine matrix
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from alignx.axes import Axis

SPLITS = ("train", "validation", "test")
_FILE_MODE = 0o644  # mkstemp creates 0600; run directories are shared between users and nodes
MULTITASK = "multitask"


class ArtifactMismatchError(ValueError):
    """Two artifacts that must agree (e.g. base model ids) do not."""


class ArtifactNotFoundError(FileNotFoundError):
    """A stage's input artifact is missing; the message names the command that makes it."""


# ----------------------------------------------------------------------------- atomic I/O


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + ``os.replace``)."""
    p = Path(path)
    _atomic_write_bytes(p, data)
    return p


def write_text_atomic(path: str | Path, text: str) -> Path:
    p = Path(path)
    _atomic_write_bytes(p, text.encode("utf-8"))
    return p


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write JSON (pydantic models are dumped first) atomically."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file.

    Raises:
        ArtifactNotFoundError: the file does not exist.
        ValueError: it is not valid JSON (names the file).
    """
    p = Path(path)
    if not p.is_file():
        raise ArtifactNotFoundError(f"missing artifact: {p}")
    try:
        return json.loads(p.read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e}); delete it and rerun the stage that wrote it") from None


def write_parquet_atomic(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` (a list of flat dicts) as a Parquet file, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    os.close(fd)
    try:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def read_parquet(path: str | Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise ArtifactNotFoundError(f"missing artifact: {p}")
    return pq.read_table(p).to_pylist()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_strings(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for s in parts:
        h.update(s.encode())
        h.update(b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------- manifests


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _version() -> str:
    from alignx import __version__

    return __version__


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alignx_version: str = Field(default_factory=_version)
    created_at: str = Field(default_factory=_now)


class SplitInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str  # relative to the manifest's folder
    count: int
    sha256: str


class DataManifest(_Manifest):
    """Stage ``prepare``: one axis's processed splits."""

    axis: Axis
    source: str
    source_files: dict[str, str] = Field(default_factory=dict, description="split -> raw file or hub id")
    template_id: str
    template_system: str
    splits: dict[str, SplitInfo]
    data_hash: str
    config_hash: str


class AdapterManifest(_Manifest):
    """Stage ``train``: one LoRA adapter (an axis expert, or the multi-task baseline)."""

    name: str  # axis value, or "multitask"
    axes: list[Axis]
    base_model: str
    template_ids: dict[str, str]
    data_hash: str
    lora: dict[str, Any]
    zero_stage: int
    num_workers: int
    steps: int
    train_tokens: int
    train_loss: float | None
    eval_loss: dict[str, float] = Field(default_factory=dict, description="axis -> held-out answer loss")
    tokens_per_s: float | None
    train_seconds: float
    config_hash: str
    ray_run: str = ""


class H3FusionManifest(_Manifest):
    """Baseline ``h3fusion``: learned per-token gates over the axis experts (METHOD.md baselines)."""

    name: str = "h3fusion"
    axes: list[Axis]  # expert order of the gates' outputs
    base_model: str
    experts: dict[str, str] = Field(description="axis -> sha256[:16] of its adapter manifest")
    system: str = Field(description="system text injected at gate training and at inference")
    template_id: str
    gate_top_k: int | None
    balance_coef: float
    gated_modules: int
    gate_params: int
    steps: int
    lr: float
    micro_batch_size: int
    train_tokens: int
    train_loss: float | None
    first_loss: float | None = None
    eval_loss: dict[str, float] = Field(default_factory=dict, description="axis -> held-out answer loss")
    train_seconds: float
    config_hash: str
    ray_run: str = ""


M = TypeVar("M", bound=BaseModel)


def read_manifest(path: str | Path, kind: type[M]) -> M:
    """Read and validate a manifest.

    Raises:
        ArtifactNotFoundError: no manifest (the stage did not finish).
        ValueError: the manifest is not valid for ``kind`` (names the file and field).
    """
    raw = read_json(path)
    try:
        return kind.model_validate(raw)
    except Exception as e:  # pydantic.ValidationError: keep the message short and named
        raise ValueError(f"{path}: not a valid {kind.__name__}: {e}") from None


def read_manifest_dict(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a JSON manifest that has no pydantic model; name missing keys.

    Raises:
        ArtifactNotFoundError / ValueError: as :func:`read_json`, or a missing key.
    """
    raw = read_json(path)
    missing = [k for k in required if not isinstance(raw, dict) or k not in raw]
    if missing:
        raise ValueError(f"{path}: manifest lacks {missing}; rerun the stage that wrote it")
    return raw


def check_same_base(expected: str, found: str, what: str) -> None:
    """Raise :class:`ArtifactMismatchError` if ``found`` was made for another base model."""
    if expected != found:
        raise ArtifactMismatchError(
            f"{what} was made for base model {found!r}, but this run uses {expected!r}; "
            "use a run directory made with the same model.name"
        )


# ----------------------------------------------------------------------------- layout


class ArtifactLayout:
    """Every path of a run directory, in one place."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir).expanduser().resolve()

    # config
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    # data
    def data_dir(self, axis: Axis) -> Path:
        return self.root / "data" / axis.value

    def data_split(self, axis: Axis, split: str) -> Path:
        return self.data_dir(axis) / f"{split}.parquet"

    def data_manifest(self, axis: Axis) -> Path:
        return self.data_dir(axis) / "manifest.json"

    # adapters
    def adapter_dir(self, name: str | Axis) -> Path:
        return self.root / "adapters" / (name.value if isinstance(name, Axis) else name)

    def adapter_manifest(self, name: str | Axis) -> Path:
        return self.adapter_dir(name) / "manifest.json"

    # baselines
    def baseline_dir(self, name: str) -> Path:
        return self.root / "baselines" / name

    @property
    def ray_train_dir(self) -> Path:
        return self.root / "ray_train"

    @property
    def stage1_report(self) -> Path:
        return self.root / "stage1_report.json"

    def save_config(self, cfg: Any, name: str = "config.yaml") -> Path:
        """Write the resolved config (an ``AlignXConfig``) into the run directory."""
        return write_text_atomic(self.root / name, cfg.to_yaml())

    def load_data_manifest(self, axis: Axis) -> DataManifest:
        p = self.data_manifest(axis)
        if not p.is_file():
            raise ArtifactNotFoundError(
                f"no prepared data for axis {axis.value!r} in {self.root} "
                f"(run `alignx prepare --run-dir {self.root}` first)"
            )
        return read_manifest(p, DataManifest)

    def load_adapter_manifest(self, name: str | Axis) -> AdapterManifest:
        p = self.adapter_manifest(name)
        n = name.value if isinstance(name, Axis) else name
        if not p.is_file():
            raise ArtifactNotFoundError(
                f"no trained adapter {n!r} in {self.root} (run `alignx train --run-dir {self.root}` first)"
            )
        return read_manifest(p, AdapterManifest)
