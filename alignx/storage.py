"""Shared storage: one copy of every run that all nodes of a cluster see.

Without ``storage`` in the config nothing here does anything: the run directory is the
only copy of a run, as on a laptop. With ``storage`` set (a local or NFS path,
``file:///abs/path``, ``s3://bucket/prefix`` or ``gs://bucket/prefix``):

* the run lives at ``<storage>/<name of run_dir>`` with the same layout as a run directory
  (:class:`~alignx.artifacts.ArtifactLayout`), and Ray Train keeps its checkpoints under its
  ``ray_train/`` (``RunConfig(storage_path=..., storage_filesystem=...)``, see
  :func:`ray_train_location`);
* ``run_dir`` stays the local working copy on every node: stages write there with the
  atomic helpers of :mod:`alignx.artifacts`, unchanged, and then :func:`publish` the finished
  artifact: the remote manifest is deleted first, the files are uploaded, stale files removed,
  and the manifest uploaded *last* (an object store makes a whole object visible at once; on a
  local/NFS target the manifest is written beside and renamed);
* a consumer (a training worker on another node, a later stage, a Serve replica) calls
  :func:`fetch`, which copies an artifact down only when its remote manifest exists, does
  nothing when the local manifest is byte-identical, re-fetches when it differs, checks that
  the remote manifest did not change while the files were copied (a concurrent republish), and
  installs the copy with one rename. A half-published artifact is therefore never consumed.

An artifact is a directory with a ``manifest.json`` (``data/<axis>``, ``adapters/<name>``,
``router``) or a single self-contained file written in one piece (``stage1_report.json``,
``config.yaml``).

Endpoints and credentials: the S3 endpoint of MinIO/Ceph/moto goes in the URI's query
(``s3://bucket/p?endpoint_override=host:9000&scheme=http``, pyarrow's own options) or in the
standard ``AWS_ENDPOINT_URL_S3`` variable. Credentials are read by pyarrow from the
environment of each process (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, an instance
profile, ``GOOGLE_APPLICATION_CREDENTIALS``); a URI that carries credentials is refused.
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from alignx.artifacts import ArtifactLayout, ArtifactNotFoundError, write_text_atomic

if TYPE_CHECKING:
    import pyarrow.fs

    from alignx.config import AlignXConfig

log = logging.getLogger(__name__)

#: URI schemes ``storage`` accepts (besides plain local/NFS paths).
SCHEMES = ("file", "s3", "gs")
MANIFEST = "manifest.json"
_FILE_ARTIFACT_SUFFIXES = (".json", ".yaml")
_CREDENTIAL_PARAMS = {"access_key", "secret_key", "session_token", "credentials"}
_FIX = "use a local or NFS path, file:///abs/path, s3://bucket/prefix or gs://bucket/prefix"


class StorageError(RuntimeError):
    """Shared storage cannot be reached or used; the message names ``storage`` and the URI."""


def is_uri(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a URI (``scheme://...``) rather than a local path."""
    return "://" in str(location)


def check_storage(value: str) -> str:
    """Validate a ``storage`` value (syntax only, no network) and return it normalised.

    Raises:
        ValueError: an empty value, an unsupported scheme, a URI without bucket, a relative
            ``file://`` path, or credentials in the URI; the message names the fix.
    """
    v = value.strip()
    if not v:
        raise ValueError(f"storage is empty; {_FIX}, or leave it unset for local runs")
    if not is_uri(v):
        return v.rstrip("/") or "/"
    parts = urlsplit(v)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"unsupported scheme {scheme + '://'!r} in storage={v!r}; {_FIX}")
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"storage={v!r}: a file:// URI needs an absolute path, e.g. "
                             "file:///mnt/shared/alignx")
    else:
        if "@" in parts.netloc or _CREDENTIAL_PARAMS & {k for k, _ in parse_qsl(parts.query)}:
            raise ValueError("storage carries credentials (user:secret@ or a key parameter); "
                             "remove them from the config and set "
                             "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the cloud's own "
                             "credential variables) in the environment instead")
        if not parts.netloc:
            raise ValueError(f"storage={v!r} names no bucket; write {scheme}://bucket/prefix")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), parts.query, ""))


def join(location: str, rel: str) -> str:
    """``location`` (a path or URI, query kept) with ``rel`` appended to its path."""
    if not is_uri(location):
        return posixpath.join(location, rel)
    p = urlsplit(location)
    return urlunsplit((p.scheme, p.netloc, p.path.rstrip("/") + "/" + rel, p.query, ""))


def _is_file_artifact(rel: str) -> bool:
    return PurePosixPath(rel).suffix in _FILE_ARTIFACT_SUFFIXES


def _hidden(rel: str) -> bool:
    """Temp files of atomic writes and swapped-out folders start with a dot."""
    return any(part.startswith(".") for part in PurePosixPath(rel).parts)


class Storage:
    """A run (or any folder) on shared storage, addressed by a path or URI.

    Args:
        location: a local/NFS path or a ``file://``, ``s3://`` or ``gs://`` URI.
    """

    def __init__(self, location: str):
        loc = check_storage(location)
        self.location = loc if is_uri(loc) else str(Path(loc).expanduser().resolve())
        self._fs: pyarrow.fs.FileSystem | None = None
        self._root = ""

    def __repr__(self) -> str:
        return f"Storage({self.location!r})"

    # ------------------------------------------------------------------ filesystem

    def _connect(self) -> None:
        import pyarrow.fs as pafs

        try:
            fs, root = pafs.FileSystem.from_uri(self.location)
        except Exception as e:  # ArrowInvalid (bad option), OSError (region lookup, DNS)
            raise StorageError(f"storage {self.location}: {e}") from None
        self._root = root.rstrip("/") or "/"
        self._fs = fs

    @property
    def fs(self) -> pyarrow.fs.FileSystem:
        """The pyarrow filesystem (created on first use: it may need the network)."""
        if self._fs is None:
            self._connect()
        return self._fs  # type: ignore[return-value]

    def fs_path(self, rel: str = "") -> str:
        """Path of ``rel`` on :attr:`fs` (what ``RunConfig(storage_path=...)`` wants)."""
        self.fs  # noqa: B018 - resolves the root
        return posixpath.join(self._root, rel) if rel else self._root

    def _io(self, what: str, fn, *args):  # noqa: ANN001, ANN202 - a thin error wrapper
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise StorageError(f"storage {self.location}: cannot {what}: {e}") from None

    def read_bytes(self, rel: str) -> bytes | None:
        """The bytes of remote file ``rel``, or ``None`` when it does not exist."""
        def read() -> bytes:
            with self.fs.open_input_stream(self.fs_path(rel)) as f:
                return f.read()

        try:
            return self._io(f"read {rel}", read)
        except FileNotFoundError:
            return None

    def _write_bytes(self, rel: str, data: bytes) -> None:
        """Write a remote file so that readers see all of it or nothing."""
        import pyarrow.fs as pafs

        path = self.fs_path(rel)

        def write(target: str) -> None:
            self.fs.create_dir(posixpath.dirname(target), recursive=True)
            with self.fs.open_output_stream(target) as f:
                f.write(data)

        if isinstance(self.fs, pafs.LocalFileSystem):  # a plain write is visible while it grows
            tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{os.getpid()}.tmp")
            self._io(f"write {rel}", write, tmp)
            self._io(f"write {rel}", self.fs.move, tmp, path)
        else:  # object stores publish an object when its upload completes
            self._io(f"write {rel}", write, path)

    def _delete_file(self, rel: str) -> None:
        try:
            self._io(f"delete {rel}", self.fs.delete_file, self.fs_path(rel))
        except FileNotFoundError:
            pass

    def _list(self, rel: str) -> list[str]:
        """Files under remote folder ``rel``, relative to it (empty when it does not exist)."""
        import pyarrow.fs as pafs

        base = self.fs_path(rel)
        sel = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        infos = self._io(f"list {rel}", self.fs.get_file_info, sel)
        return sorted(posixpath.relpath(i.path, base) for i in infos
                      if i.type == pafs.FileType.File)

    def _copy(self, src: str, dst: str, up: bool) -> None:
        import pyarrow.fs as pafs

        local = pafs.LocalFileSystem()
        if up:
            self.fs.create_dir(posixpath.dirname(dst), recursive=True)
        else:
            Path(dst).parent.mkdir(parents=True, exist_ok=True)
        self._io(f"copy {src}", pafs.copy_files, src, dst,
                 local if up else self.fs, self.fs if up else local)

    def remove(self, rel: str) -> None:
        """Delete remote folder ``rel`` (missing: nothing to do)."""
        import pyarrow.fs as pafs

        path = self.fs_path(rel)
        if self._io(f"stat {rel}", self.fs.get_file_info, path).type != pafs.FileType.NotFound:
            self._io(f"delete {rel}", self.fs.delete_dir, path)

    # ------------------------------------------------------------------ publish / fetch

    def publish(self, local_root: Path, rel: str) -> bool:
        """Upload the finished artifact ``local_root/rel``, its manifest last.

        Args:
            local_root: the local run directory.
            rel: the artifact, relative to the run (``adapters/honesty``, ``stage1_report.json``).

        Returns:
            ``True`` if anything was uploaded, ``False`` when the remote copy was already the same.

        Raises:
            ArtifactNotFoundError: the local artifact is not finished (no manifest).
            StorageError: the storage cannot be written.
        """
        src = local_root / rel
        man_rel = rel if _is_file_artifact(rel) else f"{rel}/{MANIFEST}"
        man = local_root / man_rel
        if not man.is_file():
            raise ArtifactNotFoundError(f"cannot publish {src}: it has no {man.name} (unfinished)")
        data = man.read_bytes()
        if self.read_bytes(man_rel) == data:
            return False
        if not _is_file_artifact(rel):
            self._delete_file(man_rel)  # from here on the remote artifact reads as unfinished
            files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
            files = [f for f in files if f != MANIFEST and not _hidden(f)]
            for f in files:
                self._copy(str(src / f), self.fs_path(f"{rel}/{f}"), up=True)
            for stale in set(self._list(rel)) - set(files) - {MANIFEST}:
                self._delete_file(f"{rel}/{stale}")
        self._write_bytes(man_rel, data)
        log.info("published %s -> %s", rel, join(self.location, rel))
        return True

    def fetch(self, local_root: Path, rel: str, attempts: int = 3) -> bool:
        """Copy the finished remote artifact ``rel`` into ``local_root/rel`` when it differs.

        Args:
            local_root: the local run directory (or a mirror of the run).
            rel: the artifact, relative to the run.
            attempts: tries when the remote artifact is republished during the copy.

        Returns:
            ``True`` when ``local_root/rel`` now equals a finished remote artifact,
            ``False`` when the remote one is missing or unfinished (nothing is copied).

        Raises:
            StorageError: the storage cannot be read, or the artifact kept changing.
        """
        dst = local_root / rel
        man_rel = rel if _is_file_artifact(rel) else f"{rel}/{MANIFEST}"
        for _ in range(attempts):
            want = self.read_bytes(man_rel)
            if want is None:
                return False
            local_man = local_root / man_rel
            if local_man.is_file() and local_man.read_bytes() == want:
                return True
            if _is_file_artifact(rel):
                write_text_atomic(dst, want.decode("utf-8"))
                return True
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-fetch-", dir=dst.parent))
            try:
                for f in self._list(rel):
                    if f != MANIFEST:
                        self._copy(self.fs_path(f"{rel}/{f}"), str(tmp / f), up=False)
                write_text_atomic(tmp / MANIFEST, want.decode("utf-8"))
                if self.read_bytes(man_rel) != want:  # republished while we copied: again
                    continue
                _install_dir(tmp, dst)
                log.info("fetched %s -> %s", join(self.location, rel), dst)
                return True
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(f"storage {join(self.location, rel)} changed during {attempts} "
                           "fetches; is a stage still publishing it? retry when it has finished")


def _install_dir(new: Path, dst: Path, attempts: int = 5) -> None:
    """Put folder ``new`` at ``dst`` by renames (the old copy is moved away first).

    Another process on this node may install the same artifact at the same moment: when a
    rename loses that race and ``dst`` then holds the same manifest, theirs is kept.
    """
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}-old-", dir=dst.parent))
    want = (new / MANIFEST).read_bytes()
    try:
        for i in range(attempts):
            try:
                if dst.exists():
                    os.replace(dst, old / str(i))
                os.replace(new, dst)
                return
            except OSError:
                if (dst / MANIFEST).is_file() and (dst / MANIFEST).read_bytes() == want:
                    return
                if i == attempts - 1:
                    raise
                time.sleep(0.05 * (i + 1))
    finally:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- run helpers


@functools.lru_cache(maxsize=64)
def _storage(location: str) -> Storage:
    return Storage(location)


def run_location(cfg: AlignXConfig) -> str | None:
    """Where the run lives on shared storage (``<storage>/<run_dir name>``), or ``None``."""
    if cfg.storage is None:
        return None
    return join(cfg.storage, Path(cfg.run_dir).name)


def run_storage(cfg: AlignXConfig) -> Storage | None:
    """The :class:`Storage` of the run, or ``None`` when ``storage`` is unset."""
    loc = run_location(cfg)
    return None if loc is None else _storage(loc)


def _rels(cfg: AlignXConfig, artifacts: Iterable[str | Path]) -> list[str]:
    root = ArtifactLayout(cfg.run_dir).root
    return [Path(a).relative_to(root).as_posix() if Path(a).is_absolute() else str(a)
            for a in artifacts]


def publish(cfg: AlignXConfig, *artifacts: str | Path) -> None:
    """Publish finished artifacts of the run (paths under ``run_dir``, or relative to it).

    A no-op without ``storage``. See :meth:`Storage.publish`.
    """
    st = run_storage(cfg)
    if st is not None:
        root = ArtifactLayout(cfg.run_dir).root
        for rel in _rels(cfg, artifacts):
            st.publish(root, rel)


def fetch(cfg: AlignXConfig, *artifacts: str | Path) -> dict[str, bool]:
    """Bring finished artifacts of the run from shared storage into ``run_dir``.

    A no-op without ``storage`` (every value ``False``). Missing or unfinished remote
    artifacts are left alone: the caller's own "not found" check then names the command.

    Returns:
        ``{artifact: whether run_dir now holds the finished remote copy}``.
    """
    st = run_storage(cfg)
    rels = _rels(cfg, artifacts)
    if st is None:
        return dict.fromkeys(rels, False)
    root = ArtifactLayout(cfg.run_dir).root
    return {rel: st.fetch(root, rel) for rel in rels}


def remove(cfg: AlignXConfig, rel: str) -> None:
    """Delete a folder of the run on shared storage (a no-op without ``storage``)."""
    st = run_storage(cfg)
    if st is not None:
        st.remove(rel)


def ray_train_location(cfg: AlignXConfig) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig``.

    Without ``storage``: ``<run_dir>/ray_train`` and ``None`` (Ray's local default).
    """
    st = run_storage(cfg)
    if st is None:
        return str(ArtifactLayout(cfg.run_dir).ray_train_dir), None
    return st.fs_path("ray_train"), st.fs


def mirror_dir(location: str) -> Path:
    """The local folder that mirrors a storage URI (under ``$ALIGNX_CACHE_DIR/storage``)."""
    from alignx.envs import cache_dir

    p = urlsplit(location)
    return cache_dir() / "storage" / p.scheme / (p.netloc or "_") / p.path.strip("/")


def localize(run_dir: str | Path, *artifacts: str) -> Path:
    """A local run directory holding ``artifacts`` of ``run_dir``, which may be a URI.

    A local path is returned as it is. For a URI (a run on shared storage) the artifacts are
    fetched into :func:`mirror_dir` (only finished ones; again when they changed).

    Raises:
        ArtifactNotFoundError: an artifact is missing or unfinished on the storage.
        StorageError: the storage cannot be read.
    """
    if not is_uri(run_dir):
        return Path(run_dir)
    st = _storage(str(run_dir))
    local = mirror_dir(st.location)
    for rel in artifacts:
        if not st.fetch(local, rel):
            raise ArtifactNotFoundError(
                f"no finished {rel} in {join(st.location, rel)} (its manifest is missing: the "
                "stage that writes it has not finished and published it yet)")
    return local


def same_run(a: str | Path, b: str | Path) -> bool:
    """Whether two run locations (paths or URIs) name the same run."""
    if is_uri(a) or is_uri(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
