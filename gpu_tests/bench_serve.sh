#!/usr/bin/env bash
# Agentic replay against mixquant serve, one server per precision pair, on the Qwen3-8B shape (random weights).
#   bash gpu_tests/bench_serve.sh OUT_DIR [bench serve flags...]
# Needs .carry/server-wheels (fastapi and what it needs beyond the device image: starlette, pydantic, pydantic_core,
# annotated_types, typing_inspection, typing_extensions, opentelemetry_api, uvicorn, h11, click); with .carry/cudnn-wheels (cudnn-frontend) the fp8/bf16 server's default prefill attention
# takes cuDNN's FP8 attention for uncached segments of 8,192 tokens or more.
set -uo pipefail
out=${1:?usage: bench_serve.sh OUT_DIR [flags]}
shift
mkdir -p "$out"
source gpu_tests/device_env.sh
shape=$(python3 -c "from mixquant.bench.shapes import shape_dir; print(shape_dir('qwen3-8b'))")
tokenizer=$(python3 -c "from tests.data import qwen3_tokenizer; print(qwen3_tokenizer())")
status=0
for pair in bf16/bf16 fp8/bf16; do
  name=${pair/\//-}
  python3 -m mixquant.cli serve "$shape" --load-format dummy --tokenizer "$tokenizer" \
    --served-model-name qwen3-8b-shape --prefill-precision ${pair%/*} --decode-precision ${pair#*/} \
    --max-model-len 40960 --port 8011 --uvicorn-log-level warning > "$out/server-$name.log" 2>&1 &
  server=$!
  up=0  # a server that exits while starting fails the pair at once, not after the whole wait
  for _ in $(seq 240); do
    curl -sf localhost:8011/health >/dev/null && { up=1; break; }
    kill -0 $server 2>/dev/null || break
    sleep 1
  done
  if [ $up = 0 ]; then
    echo "=== server $pair did not start:"; tail -5 "$out/server-$name.log"; kill $server 2>/dev/null; status=1; continue
  fi
  python3 -m mixquant.cli bench serve --base-url http://127.0.0.1:8011/v1 --model qwen3-8b-shape \
    --output "$out/serve-$name.json" "$@" || status=1
  kill -TERM $server; wait $server
done
exit $status
