#!/usr/bin/env bash
# One-GPU smoke test of the sharded training paths (a few minutes on one GPU; it cannot run on CPU-only machines):
# LoRA with DeepSpeed ZeRO-2 and ZeRO-3 on a random-init Qwen2 (hidden 256, 4 layers, bf16, gradient checkpointing),
# then for each: adapter complete, reloaded with plain peft == in-memory weights (and DeepSpeed's fp32 master),
# export from the checkpoint == saved adapter; tokens/s and peak memory. Non-zero exit if any check fails.
#
#   bash scripts/gpu_smoke.sh [OUT_DIR]        (default OUT_DIR: ${TMPDIR:-/tmp}/em_gpu_smoke)
#   EM_SMOKE_STRATEGIES="deepspeed_zero3 fsdp" bash scripts/gpu_smoke.sh   (other presets)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
OUT=${1:-${TMPDIR:-/tmp}/em_gpu_smoke}
STRATEGIES=${EM_SMOKE_STRATEGIES:-"deepspeed_zero2 deepspeed_zero3"}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_smoke: no CUDA GPU visible')"
if ! python -c "import deepspeed" >/dev/null 2>&1; then
  # No build isolation: deepspeed's setup.py imports torch, and an isolated build would fetch a (CPU) torch.
  # The torch pin keeps pip from replacing the installed CUDA torch; DS_BUILD_OPS=0: ops are JIT-built if used.
  TORCH_PIN="torch==$(python -c 'import torch; print(torch.__version__)')"
  echo "gpu_smoke: installing deepspeed (pip, no build isolation, keeping $TORCH_PIN)"
  DS_BUILD_OPS=0 python -m pip install -q --no-build-isolation "deepspeed>=0.14" "$TORCH_PIN"
fi

mkdir -p "$OUT"
status=0
start=$(date +%s)
for s in $STRATEGIES; do
  echo "== $s"
  # one process per strategy: DeepSpeed and torch.distributed keep global state
  if ! python scripts/gpu_smoke.py --strategy "$s" --out "$OUT/$s" 2>"$OUT/$s.stderr.log" | grep '^SMOKE'; then
    status=1
    echo "gpu_smoke: $s FAILED (stderr: $OUT/$s.stderr.log)"; tail -n 30 "$OUT/$s.stderr.log" || true
  fi
done
python - "$OUT" $STRATEGIES <<'PY'
import json, sys
from pathlib import Path
out, names = Path(sys.argv[1]), sys.argv[2:]
print(f"{'strategy':<26}{'tok/s':>10}{'peak GiB':>10}{'fit s':>8}  checks")
for n in names:
    f = out / n / "smoke.json"
    if not f.exists():
        print(f"{n:<26}{'-':>10}{'-':>10}{'-':>8}  no report"); continue
    r = json.loads(f.read_text())
    print(f"{n:<26}{str(r['tokens_per_s']):>10}{str(r['peak_gpu_mem_gib']):>10}{str(r['fit_s']):>8}  "
          + ("ok" if not r["problems"] else "FAILED: " + "; ".join(r["problems"][:3])))
PY
echo "gpu_smoke: $(( $(date +%s) - start )) s"
exit $status
