#!/usr/bin/env bash
# The MoE checks and timings on the Qwen3-30B-A3B shape (random weights) in one device call.
#   bash gpu_tests/run_moe.sh OUT_DIR
# nvfp4/bf16 is exact emulation on Hopper: each expert's dequantized weight is kept beside the packed one and the
# BF16 decode copy (computed for 48 layers: 56.9 GiB BF16 + 71.3 GiB NVFP4 = 128.2 GiB, over the 0.9 x 139 GiB the
# engine may use), so its rows use the shape cut to 24 layers, beside bf16/bf16 cut the same way.
set -uo pipefail
out=${1:?usage: run_moe.sh OUT_DIR}
mkdir -p "$out"
source gpu_tests/device_env.sh
step python3 gpu_tests/check_moe.py --out "$out"
step python3 -m mixquant.cli bench prefill --shape qwen3-30b-a3b --pairs bf16/bf16,fp8/bf16 \
  --contexts 2048,8192,32768 --compare transformers --repeats 3 --output-dir "$out/prefill"
step python3 -m mixquant.cli bench decode --shape qwen3-30b-a3b --pairs bf16/bf16,fp8/bf16 --batches 1,8,32,128 \
  --context 2048 --output-dir "$out/decode"
step python3 -m mixquant.cli bench prefill --shape qwen3-30b-a3b --hf-overrides '{"num_hidden_layers": 24}' \
  --pairs bf16/bf16,nvfp4/bf16 --contexts 8192 --repeats 2 --output-dir "$out/prefill-nvfp4-24-layers"
exit $status
