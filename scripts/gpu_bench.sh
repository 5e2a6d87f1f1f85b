#!/usr/bin/env bash
# GPU throughput of em's LoRA step and trl's on the same work (benchmarks/gpu_throughput.py): tokens/s, MFU and
# peak memory for Qwen2.5-0.5B / 1.5B / 7B shapes (random init), sdpa / flash-attention, packing, gradient
# checkpointing, chunked / plain / liger loss. One GPU, no network, under 8 minutes (new configurations stop
# after --budget-s; the hard limit is 470 s).
#
#   bash scripts/setup.sh && pip install -e '.[bench]'      # once, where there is network (trl; + flash-attn,
#                                                           #   '.[liger]' for those rows)
#   bash scripts/gpu_bench.sh                               # -> the table on stdout + outputs/gpu_throughput.json
#   bash scripts/gpu_bench.sh --models qwen2.5-7b --steps 20   # any benchmarks/gpu_throughput.py option
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA GPU visible to $PY; on a CPU, 'python benchmarks/gpu_throughput.py --dry-run' checks that it composes" >&2
  exit 2
fi
mkdir -p outputs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 470 "$PY" benchmarks/gpu_throughput.py --budget-s 380 --json "${EM_GPU_BENCH_JSON:-outputs/gpu_throughput.json}" "$@"
