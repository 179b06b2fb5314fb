#!/usr/bin/env bash
# The Gemma 4 checks and timings on the 31B and 26B-A4B shapes (random weights) in one device call (an H200:
# 31B fp8/bf16 holds 84.5 GiB of weights, computed by check_gemma4.py --computed).
#   bash gpu_tests/run_gemma4.sh OUT_DIR
# transformers is compared at 2k and 8k only: its SDPA falls back to the math kernel at head_dim 512, whose
# [heads, n, n] scores do not fit at 32k. nvfp4/bf16 is left out: Hopper emulates NVFP4 with a dequantized copy of
# every weight beside the BF16 one (over the card for 31B).
set -uo pipefail
out=${1:?usage: run_gemma4.sh OUT_DIR}
mkdir -p "$out"
source gpu_tests/device_env.sh
step python3 gpu_tests/check_gemma4.py --out "$out"
for shape in gemma4-31b gemma4-26b-a4b; do
  step python3 -m mixquant.cli bench prefill --shape "$shape" --pairs bf16/bf16,fp8/bf16 --contexts 2048,8192,32768 \
    --repeats 3 --output-dir "$out/prefill-$shape"
  step python3 -m mixquant.cli bench prefill --shape "$shape" --pairs bf16/bf16 --contexts 2048,8192 \
    --compare transformers --repeats 2 --output-dir "$out/prefill-transformers-$shape"
  step python3 -m mixquant.cli bench decode --shape "$shape" --pairs bf16/bf16,fp8/bf16 --batches 1,8,32 \
    --context 2048 --output-dir "$out/decode-$shape"
done
exit $status
