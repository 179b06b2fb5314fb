#!/usr/bin/env bash
# Qwen3.5 on a GPU in one device call (written without a GPU: not run yet). fla-core comes from .carry/gdn-wheels
# (pip download fla-core==0.6.0 einops --no-deps); without it the Gated DeltaNet layers run the PyTorch reference.
#   bash gpu_tests/run_qwen3_5.sh OUT_DIR
set -uo pipefail
out=${1:?usage: run_qwen3_5.sh OUT_DIR}
mkdir -p "$out"
source gpu_tests/device_env.sh
python3 -c "import fla" 2>/dev/null ||
  echo "no fla-core (.carry/gdn-wheels): the Gated DeltaNet layers run the PyTorch reference"

step python3 gpu_tests/check_qwen3_5.py --out "$out"
step python3 gpu_tests/check_qwen3_5.py --out "$out" --breakdown --prompt-len 8192
step python3 -m mixquant.cli bench prefill --shape qwen3.5-9b --pairs bf16/bf16,fp8/bf16 --contexts 2048,8192,32768 \
  --compare transformers --repeats 3 --output-dir "$out/prefill"
step python3 -m mixquant.cli bench decode --shape qwen3.5-9b --pairs bf16/bf16,fp8/bf16 --batches 1,32 \
  --context 2048 --output-dir "$out/decode"
exit $status
