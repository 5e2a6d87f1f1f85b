#!/usr/bin/env bash
# Set up em in ./.venv: torch (a CPU wheel unless one is already there), then em with its dev extras.
# Usage: bash scripts/setup.sh            (EM_TORCH_SPEC overrides the torch requirement, e.g. on a GPU box:
#        EM_TORCH_SPEC="torch==2.13.0" with the CUDA index of your choice configured in pip)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! python -c "import torch" >/dev/null 2>&1; then
  # Pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 resolves to the local CPU wheel here.
  python -m pip install -q "${EM_TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v "is ignored" || true
fi
python -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
if [ "${EM_WITH_DEEPSPEED:-0}" = "1" ] && ! python -c "import deepspeed" >/dev/null 2>&1; then
  # No build isolation: an isolated build would pull its own (CUDA) torch. DS_BUILD_OPS=0: ops JIT-build on a GPU.
  DS_BUILD_OPS=0 python -m pip install -q --no-build-isolation "deepspeed>=0.14" 2>&1 | grep -v "is ignored" || true
  python -c "import deepspeed" >/dev/null 2>&1 || echo "warning: deepspeed did not install; its tests will be skipped"
fi
python -c "import em, torch, lightning, transformers, peft, hydra; print(f'em ready: torch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"
