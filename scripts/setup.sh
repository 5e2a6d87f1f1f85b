#!/usr/bin/env bash
# Set up em in ./.venv: torch (a CPU wheel unless one is already there), then em with its dev extras.
# Usage: bash scripts/setup.sh            (EM_TORCH_SPEC overrides the torch requirement, e.g. on a GPU box:
#        EM_TORCH_SPEC="torch==2.13.0" with the CUDA index of your choice configured in pip)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
LOG=.venv/setup.log
: > "$LOG"
pip_install() {  # pip's and the build backends' chatter goes to .venv/setup.log; shown only when pip fails
  echo "installing $*" >> "$LOG"
  python -m pip install -q "$@" >> "$LOG" 2>&1 || { tail -40 "$LOG"; echo "pip install $* failed: see $LOG"; exit 1; }
}
pip_install --upgrade pip
if ! python -c "import torch" >/dev/null 2>&1; then
  # Pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 resolves to the local CPU wheel here.
  pip_install "${EM_TORCH_SPEC:-torch==2.13.0}"
fi
pip_install -e ".[dev]"
if [ "${EM_WITH_DEEPSPEED:-0}" = "1" ] && ! python -c "import deepspeed" >/dev/null 2>&1; then
  # No build isolation: an isolated build would pull its own (CUDA) torch. DS_BUILD_OPS=0: ops JIT-build on a GPU.
  DS_BUILD_OPS=0 python -m pip install -q --no-build-isolation "deepspeed>=0.14,<0.20" >> "$LOG" 2>&1 || true
  python -c "import deepspeed" >/dev/null 2>&1 || echo "warning: deepspeed did not install; its tests will be skipped"
fi
python -c "import em, torch, lightning, transformers, peft, hydra; print(f'em ready: torch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"
