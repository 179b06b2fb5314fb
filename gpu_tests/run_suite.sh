#!/usr/bin/env bash
# The whole GPU suite in one device call: correctness first, then every timing, all into one folder.
#   bash gpu_tests/run_suite.sh OUT_DIR [quick]
# With the cudnn-frontend wheel in .carry/cudnn-wheels (pip download nvidia-cudnn-frontend==1.16.0 for the device's Python)
# it also checks cuDNN's FP8 attention and the default prefill attention takes it.
set -uo pipefail
out=${1:?usage: run_suite.sh OUT_DIR}
mode=${2:-full}
mkdir -p "$out"
source gpu_tests/device_env.sh
attentions=bf16,fp8
python3 -c "import cudnn" 2>/dev/null && attentions=bf16,fp8,fp8-cudnn

OUT="$out" step python3 gpu_tests/check_kernels.py
[ $attentions = bf16,fp8 ] || { mkdir -p "$out/cudnn"; OUT="$out/cudnn" step python3 gpu_tests/check_kernels.py --only fp8-cudnn; }
step python3 gpu_tests/check_engine.py --out "$out"
if [ "$mode" = quick ]; then
  contexts=2048,8192; batches=1,32
else
  contexts=2048,4096,8192,32768; batches=1,8,32,128
fi
step python3 -m mixquant.cli bench prefill --pairs bf16/bf16,fp8/bf16,nvfp4/bf16 --contexts $contexts \
  --compare transformers --repeats 3 --output-dir "$out/prefill"
[ "$mode" = quick ] || step python3 -m mixquant.cli bench prefill --pairs bf16/bf16,fp8/bf16 \
  --prefill-attention $attentions --contexts 4096,32768 --repeats 2 --output-dir "$out/prefill-attention"
[ "$mode" = quick ] || step python3 -m mixquant.cli bench prefill --yarn --pairs bf16/bf16,fp8/bf16 \
  --contexts 131000 --repeats 1 --output-dir "$out/prefill-128k"
step python3 -m mixquant.cli bench decode --pairs bf16/bf16,fp8/bf16,nvfp4/bf16 --batches $batches \
  --context 2048 --output-dir "$out/decode"
# decode with 0%, 50%, 100% of a batch of 32 held to a JSON schema (the Qwen3-8B shape needs a tokenizer: Qwen3's)
tokenizer=$(python3 -c "from tests.data import qwen3_tokenizer; print(qwen3_tokenizer())")
step python3 -m mixquant.cli bench structured --pairs bf16/bf16,fp8/bf16 --batch 32 --fractions 0,0.5,1 \
  --context 2048 --tokenizer "$tokenizer" --output-dir "$out/structured"
exit $status
