"""Safety of artifacts, by reading the source (AST): weights only through safetensors or
``torch.load(weights_only=True)``, no unpickling, safe YAML, ``trust_remote_code`` off unless the
config turns it on, and secrets only from the environment. A regression fails here, in CI.

The one deliberate exception: DeepSpeed's ``engine.load_checkpoint`` unpickles its optimizer
state (``torch.load(weights_only=False)`` inside DeepSpeed) when a training run resumes from the
checkpoints that same run wrote under its own ``ray_train/`` folder. It may be called only from
``alignx/train/engine.py``; adapters, routers and judges are never loaded that way.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "alignx").rglob("*.py"))
TEXT_FILES = [*SOURCES, *(REPO / "jobs").rglob("*.py"), *(REPO / "jobs").rglob("*.yaml"),
              *(REPO / "cluster").rglob("*.*"), REPO / "serve_config.yaml"]

UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
UNSAFE_YAML = {"load", "unsafe_load", "full_load", "load_all", "unsafe_load_all", "full_load_all",
               "Loader", "UnsafeLoader", "FullLoader"}
RESUME_ONLY = {"load_checkpoint": "alignx/train/engine.py"}


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _dotted(node: ast.AST) -> str:
    """``torch.load`` for ``torch.load``; ``np.load`` ...; '' for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, _dotted(node.func)


@pytest.fixture(scope="module")
def trees() -> dict[str, ast.AST]:
    return {_rel(p): ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for p in SOURCES}


def _problems(trees: dict[str, ast.AST]) -> list[str]:
    """Every unsafe construct in the package, as ``file:line: what``."""
    out: list[str] = []
    for rel, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for n in names:
                    if n.split(".")[0] in UNPICKLERS:
                        out.append(f"{rel}:{node.lineno}: imports {n} (unpickling is code execution)")
                if isinstance(node, ast.ImportFrom) and node.module == "yaml":
                    bad = {a.name for a in node.names} & UNSAFE_YAML
                    if bad:
                        out.append(f"{rel}:{node.lineno}: from yaml import {sorted(bad)}")
                if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(
                        a.name == "load" for a in node.names):
                    out.append(f"{rel}:{node.lineno}: from torch import load (call torch.load "
                               "with weights_only=True)")
        for call, name in _calls(tree):
            line = f"{rel}:{call.lineno}"
            last = name.rsplit(".", 1)[-1]
            if name.endswith("torch.load"):
                if not _is_true(_kw(call, "weights_only")):
                    out.append(f"{line}: torch.load without weights_only=True")
            elif _kw(call, "weights_only") is not None and not _is_true(_kw(call, "weights_only")):
                out.append(f"{line}: weights_only must be True")
            if name in ("np.load", "numpy.load") and not (
                    _kw(call, "allow_pickle") is None
                    or isinstance(_kw(call, "allow_pickle"), ast.Constant)
                    and _kw(call, "allow_pickle").value is False):
                out.append(f"{line}: np.load with allow_pickle")
            if name.startswith("yaml.") and last in UNSAFE_YAML:
                out.append(f"{line}: {name} (use yaml.safe_load)")
            if name in ("eval", "exec", "compile", "__import__"):
                out.append(f"{line}: {name}() on data")
            rtc = _kw(call, "trust_remote_code")
            if rtc is not None and not (
                    isinstance(rtc, ast.Constant) and rtc.value is False
                    or isinstance(rtc, ast.Attribute) and rtc.attr == "trust_remote_code"):
                out.append(f"{line}: trust_remote_code= must be False or the config's value")
            for flag in ("safe_serialization", "use_safetensors"):
                v = _kw(call, flag)
                if isinstance(v, ast.Constant) and v.value is False:
                    out.append(f"{line}: {flag}=False (weights only through safetensors)")
            if last in RESUME_ONLY and rel != RESUME_ONLY[last]:
                out.append(f"{line}: {last} (unpickles; only {RESUME_ONLY[last]} may resume)")
    return out


def test_package_has_no_unsafe_deserialization_or_remote_code(trees):
    problems = _problems(trees)
    assert not problems, "unsafe constructs:\n" + "\n".join(problems)


def test_the_scanner_catches_each_unsafe_pattern():
    """The checks above can fail: each of these snippets is reported."""
    bad = {
        "import pickle": "imports pickle",
        "import joblib": "imports joblib",
        "from yaml import load": "from yaml import",
        "import yaml\nyaml.load(s, Loader=yaml.Loader)": "yaml.load",
        "import torch\ntorch.load(p)": "torch.load without weights_only=True",
        "import torch\ntorch.load(p, weights_only=False)": "weights_only",
        "from torch import load": "from torch import load",
        "f(p, weights_only=False)": "weights_only must be True",
        "import numpy as np\nnp.load(p, allow_pickle=True)": "np.load with allow_pickle",
        "m.from_pretrained(p, trust_remote_code=True)": "trust_remote_code=",
        "m.save_pretrained(p, safe_serialization=False)": "safe_serialization=False",
        "m.from_pretrained(p, use_safetensors=False)": "use_safetensors=False",
        "eval(s)": "eval()",
        "engine.load_checkpoint(d)": "load_checkpoint",
    }
    for src, expected in bad.items():
        found = _problems({"alignx/x.py": ast.parse(src)})
        assert any(expected in p for p in found), (src, found)
    ok = ("import torch\ntorch.load(p, weights_only=True, map_location='cpu')\n"
          "import numpy as np\nnp.load(p)\nnp.load(p, allow_pickle=False)\n"
          "import yaml\nyaml.safe_load(s)\n"
          "m.from_pretrained(p, trust_remote_code=cfg.trust_remote_code)\n"
          "m.from_pretrained(p, trust_remote_code=False)\n")
    assert _problems({"alignx/x.py": ast.parse(ok)}) == []


def test_trust_remote_code_is_off_by_default():
    from alignx.config import load_config

    assert load_config(None).model.trust_remote_code is False
    for cfg in sorted((REPO / "jobs" / "configs").glob("*.yaml")):
        assert load_config(cfg).model.trust_remote_code is False, cfg.name


def _secret_fields(model: type, prefix: str = "") -> list[str]:
    """Config fields named like a credential (a key itself, not the *name* of an env var)."""
    from pydantic import BaseModel

    from alignx.envs import looks_secret

    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        if looks_secret(name):
            out.append(path)
        ann = field.annotation
        for sub in (ann, *getattr(ann, "__args__", ())):
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                out += _secret_fields(sub, path + ".")
    return out


def test_configs_take_secrets_only_as_env_var_names():
    """Judge keys (``api_key_env``) and the Serve key (``auth_env``) are *names* of variables."""
    from alignx.config import AlignXConfig
    from alignx.eval.judges import JudgeCfg
    from alignx.serve.app import AppArgs

    for model in (AlignXConfig, JudgeCfg, AppArgs):
        assert _secret_fields(model) == [], model.__name__
    assert "api_key_env" in JudgeCfg.model_fields and "auth_env" in AppArgs.model_fields


def test_no_credentials_in_shipped_files():
    patterns = {
        "OpenAI-style key": re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),
        "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}"),
        "AWS access key id": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
        "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
        "bearer token": re.compile(r"Bearer [A-Za-z0-9._-]{20,}"),
    }
    for path in TEXT_FILES:
        if not path.is_file() or path.suffix in (".png", ".safetensors"):
            continue
        text = path.read_text(encoding="utf-8", errors="ignore")
        for what, rx in patterns.items():
            assert not rx.search(text), f"{_rel(path)}: looks like a hard-coded {what}"


def test_ray_runtime_env_never_carries_credentials(monkeypatch):
    from alignx.envs import ray_runtime_env_vars

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ALIGNX_API_KEY", "k")
    monkeypatch.setenv("ALIGNX_LOG_LEVEL", "INFO")
    env = ray_runtime_env_vars()
    assert "HF_TOKEN" not in env and "ALIGNX_API_KEY" not in env
    assert env["HF_HUB_OFFLINE"] == "1" and env["ALIGNX_LOG_LEVEL"] == "INFO"
