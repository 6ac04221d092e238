#!/usr/bin/env bash
# Create ./.venv and install medfusion into it (editable) with the extras given, e.g. "test" or "demo".
#
# torch is installed first, by exact version, so that pip takes a local or matching wheel instead of
# resolving "torch>=2.1" to the newest build (which on PyPI carries several GB of CUDA libraries).
# Override with TORCH_SPEC, e.g. TORCH_SPEC="torch==2.5.1" or TORCH_SPEC="torch" for the newest.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
if [ -n "$extras" ]; then
  .venv/bin/pip install --quiet -e ".[${extras}]"
else
  .venv/bin/pip install --quiet -e .
fi
.venv/bin/medfusion --version
