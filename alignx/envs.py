"""Every ``ALIGNX_*`` environment variable, typed, with its default (vLLM ``envs.py`` style).

Read through the functions below, never with ``os.environ`` elsewhere, so the full list of
knobs lives in one place.
"""

from __future__ import annotations

import os
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


#: Variables every Ray process of ours gets (see ENVIRONMENT.md for why each matters).
RAY_ENV_DEFAULTS: dict[str, str] = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def ray_runtime_env_vars() -> dict[str, str]:
    """Env vars forwarded to Ray workers: the defaults plus the ALIGNX_/HF_/DS_/RAY_AUTH ones set here."""
    out = dict(RAY_ENV_DEFAULTS)
    for k, v in os.environ.items():
        if k.startswith(("ALIGNX_", "HF_", "DS_ACCELERATOR", "RAY_AUTH_MODE", "OMP_NUM_THREADS")):
            out[k] = v
    return out
