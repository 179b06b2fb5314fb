#!/usr/bin/env bash
# Tensor parallelism on two GPUs (nvidia-h100-x2 or nvidia-h200-x2), written for the first session that is lent them:
#   bash gpu_tests/run_tp.sh OUT_DIR [check|qwen3-8b|qwen3-32b]   (no second argument: all three parts)
# check: gpu_tests/check_tp.py (TP=2 against TP=1, graphs against eager). Then prefill and decode speed of the shape
# (random weights): TP=1 against TP=2, and fp8/bf16 against bf16/bf16 at each. Qwen3-32B's fp8/bf16 (90 GiB of
# weights) fits one H200 but not one H100: at TP=1 on H100s it runs bf16/bf16 only. Each part is meant to be one
# device call of at most 10 minutes; none has been timed yet.
set -uo pipefail
out=${1:?usage: run_tp.sh OUT_DIR [check|qwen3-8b|qwen3-32b]}
part=${2:-all}
mkdir -p "$out"
source gpu_tests/device_env.sh
# NVLink multicast stays off on the lent machines (KINDS.md); spawned ranks inherit these
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv

if [[ $part == all || $part == check ]]; then
  step python3 gpu_tests/check_tp.py --out "$out/check"
fi
for shape in qwen3-8b qwen3-32b; do
  [[ $part == all || $part == "$shape" ]] || continue
  contexts=2048,8192,32768
  [[ $shape == qwen3-32b ]] && contexts=2048,8192
  for tp in 1 2; do
    pairs=bf16/bf16,fp8/bf16
    card_gib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0 | awk '{print int($1/1024)}')
    [[ $shape == qwen3-32b && $tp == 1 && $card_gib -lt 120 ]] && pairs=bf16/bf16
    step python3 -m mixquant.cli bench prefill --shape "$shape" -tp "$tp" --pairs "$pairs" --contexts "$contexts" \
      --repeats 3 --output-dir "$out/$shape-tp$tp/prefill"
    step python3 -m mixquant.cli bench decode --shape "$shape" -tp "$tp" --pairs "$pairs" --batches 1,8,32,128 \
      --context 2048 --steps 32 --output-dir "$out/$shape-tp$tp/decode"
  done
done
exit $status
