"""Shared storage (alignx/storage.py): the ``storage`` key, publish/fetch against a real S3 API
(moto's server on loopback) and a local folder, and what a consumer never does: read a
half-published artifact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignx.artifacts import ArtifactNotFoundError
from alignx.config import AlignXConfig, AlignXConfigError, load_config
from alignx.storage import (
    Storage,
    StorageError,
    fetch,
    is_uri,
    localize,
    mirror_dir,
    publish,
    ray_train_location,
    run_location,
)

ADAPTER = "adapters/honesty"


def _cfg(run_dir: Path, storage: str | None) -> AlignXConfig:
    return AlignXConfig.model_validate({"run_dir": str(run_dir), "storage": storage})


def _write_artifact(run_dir: Path, files: dict[str, bytes], tag: str) -> Path:
    """A finished directory artifact: payload files, then its manifest."""
    d = run_dir / ADAPTER
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    (d / "manifest.json").write_text(json.dumps({"tag": tag, "files": sorted(files)}))
    return d


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(params=["s3", "local"])
def storage(request, tmp_path):
    """A ``storage`` value: the moto S3 server (one prefix per test) or a local folder."""
    if request.param == "s3":
        return request.getfixturevalue("s3_server").uri(f"unit/{tmp_path.name}")
    return str(tmp_path / "shared")


# ----------------------------------------------------------------------------- the config key


def test_storage_key_validates_scheme_and_names_the_fix(tmp_path):
    with pytest.raises(AlignXConfigError) as e:
        load_config(None, ["storage=hdfs://nn/alignx"])
    msg = str(e.value)
    assert "storage" in msg and "'hdfs://'" in msg and "s3://bucket/prefix" in msg
    with pytest.raises(AlignXConfigError, match="names no bucket"):
        load_config(None, ["storage=s3:///alignx"])
    with pytest.raises(AlignXConfigError, match="file:// URI needs an absolute path"):
        load_config(None, ["storage=file://relative/dir"])
    with pytest.raises(AlignXConfigError) as e:
        load_config(None, ["storage=s3://AKIAXXXX:topsecret@bucket/p"])
    assert "credentials" in str(e.value) and "topsecret" not in str(e.value)
    with pytest.raises(AlignXConfigError, match="credentials"):
        load_config(None, ["storage=s3://bucket/p?secret_key=x"])


def test_storage_key_forms_and_hashes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = load_config(None, ["storage=shared/runs/"], run_dir="runs/a")
    assert local.storage == str(tmp_path / "shared" / "runs")  # pinned on the driver
    assert run_location(local) == str(tmp_path / "shared" / "runs" / "a")
    s3 = load_config(None, ["storage=s3://b/p/?endpoint_override=h:9000&scheme=http"],
                     run_dir="runs/a")
    assert s3.storage == "s3://b/p?endpoint_override=h:9000&scheme=http"
    assert run_location(s3) == "s3://b/p/a?endpoint_override=h:9000&scheme=http"
    assert load_config(None, ["storage=gs://bucket/x"]).storage == "gs://bucket/x"
    plain = load_config(None, run_dir="runs/a")
    assert plain.storage is None and run_location(plain) is None
    # where a run is kept changes neither its stage hashes nor its config hash
    for stage in ("prepare", "train", "calibrate"):
        assert s3.stage_hash(stage) == plain.stage_hash(stage)
    assert s3.config_hash() == plain.config_hash()


def test_cli_bad_storage_is_one_line_error(capsys):
    from alignx.cli import main

    assert main(["config", "storage=ftp://host/x"]) == 2
    err = capsys.readouterr().err
    assert "storage" in err and "Traceback" not in err


def test_without_storage_nothing_moves(tmp_path):
    cfg = _cfg(tmp_path / "run", None)
    _write_artifact(tmp_path / "run", {"a.bin": b"1"}, "v1")
    publish(cfg, ADAPTER)
    assert fetch(cfg, ADAPTER) == {ADAPTER: False}
    assert ray_train_location(cfg) == (str(tmp_path / "run" / "ray_train"), None)
    assert localize(tmp_path / "run", ADAPTER) == tmp_path / "run"


# ----------------------------------------------------------------------------- publish / fetch


def test_publish_fetch_round_trip(storage, tmp_path):
    a, b = tmp_path / "node-a" / "run", tmp_path / "node-b" / "run"  # same run, two nodes
    cfg_a, cfg_b = _cfg(a, storage), _cfg(b, storage)
    src = _write_artifact(a, {"adapter.safetensors": b"w" * 5000, "sub/extra.txt": b"x"}, "v1")
    (src / ".adapter.safetensors.tmp123").write_bytes(b"half")  # an atomic write in progress
    st = Storage(run_location(cfg_a))
    assert st.publish(a, ADAPTER)
    assert not st.publish(a, ADAPTER)  # already there: nothing uploaded
    assert sorted(st._list(ADAPTER)) == ["adapter.safetensors", "manifest.json", "sub/extra.txt"]

    assert fetch(cfg_b, ADAPTER) == {ADAPTER: True}
    want = {k: v for k, v in _tree(src).items() if not k.startswith(".")}
    assert _tree(b / ADAPTER) == want
    mtime = (b / ADAPTER / "adapter.safetensors").stat().st_mtime_ns
    assert fetch(cfg_b, ADAPTER) == {ADAPTER: True}  # same manifest: not copied again
    assert (b / ADAPTER / "adapter.safetensors").stat().st_mtime_ns == mtime

    # a new version on node A: a file replaced, one removed -> node B re-fetches exactly it
    (src / "sub" / "extra.txt").unlink()
    _write_artifact(a, {"adapter.safetensors": b"v2"}, "v2")
    publish(cfg_a, a / ADAPTER)  # a path under run_dir works as well as a relative one
    assert sorted(st._list(ADAPTER)) == ["adapter.safetensors", "manifest.json"]
    assert fetch(cfg_b, ADAPTER) == {ADAPTER: True}
    assert _tree(b / ADAPTER) == {k: v for k, v in _tree(src).items() if not k.startswith(".")}
    assert json.loads((b / ADAPTER / "manifest.json").read_text())["tag"] == "v2"
    assert not list((b / "adapters").glob(".*"))  # no temp folders left behind


def test_file_artifact_round_trip(storage, tmp_path):
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    a.mkdir(parents=True)
    (a / "stage1_report.json").write_text('{"config_hash": "x"}')
    publish(_cfg(a, storage), "stage1_report.json")
    assert fetch(_cfg(b, storage), "stage1_report.json") == {"stage1_report.json": True}
    assert (b / "stage1_report.json").read_text() == '{"config_hash": "x"}'
    assert fetch(_cfg(b, storage), "router") == {"router": False}  # never published


def test_half_published_artifact_is_never_consumed(storage, tmp_path, monkeypatch):
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    cfg_a, cfg_b = _cfg(a, storage), _cfg(b, storage)
    _write_artifact(a, {"w.bin": b"v1"}, "v1")
    publish(cfg_a, ADAPTER)
    assert fetch(cfg_b, ADAPTER)[ADAPTER]

    # republishing dies after the payload, before the manifest (a killed node)
    _write_artifact(a, {"w.bin": b"v2-partial"}, "v2")
    real = Storage._write_bytes

    def crash(self, rel, data):
        if rel.endswith("manifest.json"):
            raise StorageError("node died")
        return real(self, rel, data)

    monkeypatch.setattr(Storage, "_write_bytes", crash)
    with pytest.raises(StorageError):
        publish(cfg_a, ADAPTER)
    monkeypatch.undo()
    st = Storage(run_location(cfg_a))
    assert "w.bin" in st._list(ADAPTER) and "manifest.json" not in st._list(ADAPTER)

    # consumers: a fresh node gets nothing; a node with v1 keeps v1 (never v1 mixed with v2)
    c = tmp_path / "c" / "run"
    assert fetch(_cfg(c, storage), ADAPTER) == {ADAPTER: False}
    assert not (c / ADAPTER).exists()
    assert fetch(cfg_b, ADAPTER) == {ADAPTER: False}
    assert (b / ADAPTER / "w.bin").read_bytes() == b"v1"
    if is_uri(storage):  # serving from the URI refuses it too (a local path is read in place)
        with pytest.raises(ArtifactNotFoundError, match="manifest is missing"):
            localize(run_location(cfg_a), ADAPTER)

    # the stage finishes on the next run: now it is consumed, whole
    publish(cfg_a, ADAPTER)
    assert fetch(cfg_b, ADAPTER)[ADAPTER] and (b / ADAPTER / "w.bin").read_bytes() == b"v2-partial"


def test_republish_during_fetch_is_detected(storage, tmp_path, monkeypatch):
    """The remote manifest changes while a consumer copies: it discards the mix and retries."""
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    cfg_a = _cfg(a, storage)
    _write_artifact(a, {"w1.bin": b"v1", "w2.bin": b"v1"}, "v1")
    publish(cfg_a, ADAPTER)
    real = Storage._copy
    fired = []

    def copy(self, src, dst, up):
        real(self, src, dst, up)
        if not up and not fired:  # after the consumer's first download: node A publishes v2
            fired.append(1)
            _write_artifact(a, {"w1.bin": b"v2", "w2.bin": b"v2"}, "v2")
            Storage(run_location(cfg_a)).publish(a, ADAPTER)

    monkeypatch.setattr(Storage, "_copy", copy)
    assert fetch(_cfg(b, storage), ADAPTER)[ADAPTER]
    assert fired
    assert {(b / ADAPTER / f).read_bytes() for f in ("w1.bin", "w2.bin")} == {b"v2"}
    assert json.loads((b / ADAPTER / "manifest.json").read_text())["tag"] == "v2"


def test_concurrent_fetches_into_one_node_agree(storage, tmp_path):
    """Training workers / replicas on one node fetch the same artifact at once."""
    from concurrent.futures import ThreadPoolExecutor

    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    src = _write_artifact(a, {f"w{i}.bin": bytes([i]) * 1000 for i in range(4)}, "v1")
    publish(_cfg(a, storage), ADAPTER)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: fetch(_cfg(b, storage), ADAPTER)[ADAPTER], range(4)))
    assert results == [True] * 4
    assert _tree(b / ADAPTER) == _tree(src)
    assert [p.name for p in (b / "adapters").iterdir()] == ["honesty"]  # no temp folders left


def test_localize_a_run_uri_uses_a_mirror(s3_server, tmp_path):
    a = tmp_path / "a" / "run"
    cfg = _cfg(a, s3_server.uri(f"mirror/{tmp_path.name}"))
    _write_artifact(a, {"w.bin": b"v1"}, "v1")
    publish(cfg, ADAPTER)
    local = localize(run_location(cfg), ADAPTER)
    assert local == mirror_dir(run_location(cfg)) and "endpoint_override" not in str(local)
    assert (local / ADAPTER / "w.bin").read_bytes() == b"v1"


def test_endpoint_from_the_environment(s3_server, tmp_path, monkeypatch):
    """MinIO-style deployments can name the endpoint in AWS_ENDPOINT_URL_S3 instead of the URI."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://{s3_server.endpoint}")
    storage = f"s3://{s3_server.bucket}/env/{tmp_path.name}"
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    _write_artifact(a, {"w.bin": b"v1"}, "v1")
    publish(_cfg(a, storage), ADAPTER)
    assert fetch(_cfg(b, storage), ADAPTER)[ADAPTER] and (b / ADAPTER / "w.bin").read_bytes() == b"v1"


def test_ray_train_location_on_s3(s3_server, tmp_path):
    from pyarrow.fs import S3FileSystem

    cfg = _cfg(tmp_path / "myrun", s3_server.uri("exp"))
    path, fs = ray_train_location(cfg)
    assert path == f"{s3_server.bucket}/exp/myrun/ray_train" and isinstance(fs, S3FileSystem)


def test_bad_storage_option_is_a_storage_error(tmp_path):
    cfg = _cfg(tmp_path / "run", "s3://b/p?endpoint_override=127.0.0.1:9&timeout=1")
    _write_artifact(tmp_path / "run", {"w.bin": b"1"}, "v1")
    with pytest.raises(StorageError, match=r"storage s3://b/p/run.*'timeout'"):
        publish(cfg, ADAPTER)


@pytest.mark.slow  # the S3 client retries a refused connection for ~6 s
def test_unreachable_storage_is_a_storage_error(tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(tmp_path / "run", f"s3://b/p?endpoint_override=127.0.0.1:{port}&scheme=http")
    _write_artifact(tmp_path / "run", {"w.bin": b"1"}, "v1")
    with pytest.raises(StorageError, match=r"storage s3://b/p/run.*cannot read"):
        publish(cfg, ADAPTER)


@pytest.mark.slow
def test_serving_loads_a_run_from_s3(tiny_run, s3_server, tmp_path):
    """Serve replicas on any node load the experts and the router from the run's S3 URI."""
    import numpy as np

    from alignx.artifacts import ArtifactLayout, read_json, sha256_file
    from alignx.axes import AXES, Axis
    from alignx.router.serving import load
    from alignx.serve.app import build_app
    from alignx.serve.expert import load_expert_state

    cfg = tiny_run.model_copy(update={"storage": s3_server.uri(f"serve/{tmp_path.name}")})
    layout = ArtifactLayout(cfg.run_dir)
    publish(cfg, *(layout.adapter_dir(a) for a in AXES), layout.root / "router")
    uri = run_location(cfg)

    state = load_expert_state(uri, Axis.HONESTY, cfg.model)
    assert state.provenance.run == uri
    assert state.provenance.manifest_sha256 == sha256_file(layout.adapter_manifest(Axis.HONESTY))[:16]
    assert build_app({"run_dir": uri, "config": str(layout.config_path)}) is not None

    remote, local = load(uri), load(cfg.run_dir)
    assert remote.manifest == read_json(layout.root / "router" / "manifest.json")
    # features: h(x), then the OOD detector's layer state (its files travel with the router)
    width = remote.manifest["encoder_dim"] + remote.manifest["ood_detector"]["dim"]
    h = np.random.default_rng(0).normal(size=(8, width)).astype("float32")
    assert remote.ood is not None
    assert [(i.axis, round(i.confidence, 6), i.ood) for i in remote.route(h)] == [
        (i.axis, round(i.confidence, 6), i.ood) for i in local.route(h)]
