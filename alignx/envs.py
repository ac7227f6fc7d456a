"""Every ``ALIGNX_*`` environment variable, typed, with its default (vLLM ``envs.py`` style).

Read through the functions below, never with ``os.environ`` elsewhere, so the full list of
knobs lives in one place.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def data_dir() -> Path | None:
    """``ALIGNX_DATA_DIR``: folder holding ``alpaca/``, ``hh_rlhf_harmless/``, ``truthfulqa/``..."""
    v = os.environ.get("ALIGNX_DATA_DIR")
    return Path(v).expanduser() if v else None


def cache_dir() -> Path:
    """``ALIGNX_CACHE_DIR``: dequantized/built models (default ``~/.cache/alignx``)."""
    return Path(os.environ.get("ALIGNX_CACHE_DIR", "~/.cache/alignx")).expanduser()


def log_level() -> str:
    """``ALIGNX_LOG_LEVEL``: logging level of the ``alignx`` loggers (default INFO)."""
    return os.environ.get("ALIGNX_LOG_LEVEL", "INFO").upper()


def setup_logging() -> None:
    """Timestamped log lines at :func:`log_level`, the same in the CLI and in the Ray tasks and
    actors that run a stage (a no-op where logging is configured already)."""
    import logging

    logging.basicConfig(level=log_level(), format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")


#: Variables every Ray process of ours gets (see ENVIRONMENT.md for why each matters).
RAY_ENV_DEFAULTS: dict[str, str] = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


_SECRET_PARTS = {"TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIALS", "APIKEY"}
_NOT_SECRET_SUFFIXES = ("_PATH", "_FILE", "_ENV", "_MODE")


def looks_secret(name: str) -> bool:
    """Whether an env var name looks like a credential (``HF_TOKEN``, ``OPENAI_API_KEY``, ...).

    Names ending in ``_PATH``/``_FILE``/``_ENV``/``_MODE`` point at or describe a secret and
    are not one (``RAY_AUTH_TOKEN_PATH``, ``RAY_AUTH_MODE``, ``api_key_env``).
    """
    upper = name.upper()
    if upper.endswith(_NOT_SECRET_SUFFIXES):
        return False
    return bool(set(re.split(r"[^A-Z0-9]+", upper)) & _SECRET_PARTS)


def ray_runtime_env_vars() -> dict[str, str]:
    """Env vars forwarded to Ray workers: the defaults plus the ALIGNX_/HF_/DS_/RAY_AUTH ones set
    here, except credentials (``HF_TOKEN``...): a runtime env is stored in Ray's job table and
    shown by the dashboard, and workers of a local Ray inherit this process's environment anyway."""
    out = dict(RAY_ENV_DEFAULTS)
    for k, v in os.environ.items():
        if k.startswith(("ALIGNX_", "HF_", "DS_ACCELERATOR", "RAY_AUTH_MODE", "OMP_NUM_THREADS")) \
                and not looks_secret(k):
            out[k] = v
    return out
