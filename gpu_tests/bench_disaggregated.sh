#!/usr/bin/env bash
# Disaggregated prefill/decode against co-located serving, each behind `mixquant proxy`, agentic replay (issue 27):
#   disaggregated  a prefill-only fp8 instance (kv_producer, fp8 weights only) and a bf16/bf16 decode instance
#                  (kv_consumer), the KV moved by NIXL
#   colocated      two fp8/bf16 instances, requests taken in turn
#   bf16           two bf16/bf16 instances, requests taken in turn
# then TTFT p50/p99, ITL p99 and throughput of the three side by side.
#   bash gpu_tests/bench_disaggregated.sh OUT_DIR [bench serve flags...]
# Two GPUs or more: each configuration's two instances get GPU 0 and GPU 1. One GPU: they share it
# (GPU_MEMORY_UTILIZATION each, default 0.42), which is how to read its numbers.
# Needs nixl importable on the machine (pip install 'mixquant[nixl]'), and on a device image the server wheels of
# gpu_tests/bench_serve.sh in .carry/server-wheels.
# The CPU can run it end to end to check the orchestration (no meaningful timings):
#   DEVICE=cpu MODEL=mixquant-tiny bash gpu_tests/bench_disaggregated.sh OUT --sessions 2 --turns 2 \
#     --system-tokens 32 --first-context 64 --tool-tokens 16,32 --output-tokens 8 --vocab-size 2408
set -uo pipefail
out=${1:?usage: bench_disaggregated.sh OUT_DIR [bench serve flags]}
shift
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .carry/server-wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/server-wheels/*.whl >/dev/null || exit 1
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 -c "import nixl" 2>/dev/null || { echo "nixl is not installed: pip install 'mixquant[nixl]'"; exit 1; }
device=${DEVICE:-cuda}
if [ -n "${MODEL:-}" ]; then
  model=("$MODEL" --served-model-name bench)
else
  shape=$(python3 -c "from mixquant.bench.shapes import shape_dir; print(shape_dir('qwen3-8b'))")
  tokenizer=$(python3 -c "from tests.data import qwen3_tokenizer; print(qwen3_tokenizer())")
  model=("$shape" --served-model-name bench --load-format dummy --tokenizer "$tokenizer" --max-model-len 40960)
fi
gpus=0
[ "$device" = cuda ] && gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
share=${GPU_MEMORY_UTILIZATION:-0.42}
[ "$gpus" -ge 2 ] && share=0.9
pids=()
trap 'kill ${pids[*]} 2>/dev/null; wait' EXIT

# instance NAME PORT GPU [serve flags...]: a server in the background, its log in OUT_DIR
instance() {
  local name=$1 port=$2 gpu=$3
  shift 3
  CUDA_VISIBLE_DEVICES=$([ "$gpus" -ge 2 ] && echo "$gpu" || echo 0) python3 -m mixquant.cli serve "${model[@]}" \
    --device "$device" --gpu-memory-utilization "$share" --port "$port" --uvicorn-log-level warning "$@" \
    > "$out/$name.log" 2>&1 &
  pids+=($!)
}

wait_up() {
  for port in "$@"; do
    for _ in $(seq 600); do
      curl -sf "localhost:$port/health" >/dev/null && continue 2
      sleep 1
    done
    echo "=== the instance on port $port did not start"; tail -5 "$out"/*.log; return 1
  done
}

# run NAME PROXY_FLAGS...: the proxy in front of the instances started before, the replay through it, all stopped
run() {
  local name=$1
  shift
  python3 -m mixquant.cli proxy --port 8010 --uvicorn-log-level warning "$@" > "$out/proxy-$name.log" 2>&1 &
  pids+=($!)
  wait_up 8011 8012 8010 && python3 -m mixquant.cli bench serve --base-url http://127.0.0.1:8010/v1 --model bench \
    --output "$out/serve-$name.json" "${bench_flags[@]}"
  local status=$?
  kill "${pids[@]}" 2>/dev/null
  wait "${pids[@]}" 2>/dev/null
  pids=()
  return $status
}

bench_flags=("$@")
kv() { echo "{\"kv_connector\": \"NixlConnector\", \"kv_role\": \"$1\", \"kv_port\": $2}"; }
status=0
instance prefill 8011 0 --prefill-precision fp8 --kv-transfer-config "$(kv kv_producer 5611)"
instance decode 8012 1 --prefill-precision bf16 --decode-precision bf16 --kv-transfer-config "$(kv kv_consumer 5612)"
run disaggregated --prefill http://127.0.0.1:8011 --decode http://127.0.0.1:8012 || status=1
for pair in fp8/bf16 bf16/bf16; do
  instance "${pair/\//-}-a" 8011 0 --prefill-precision ${pair%/*} --decode-precision ${pair#*/}
  instance "${pair/\//-}-b" 8012 1 --prefill-precision ${pair%/*} --decode-precision ${pair#*/}
  run "$([ $pair = fp8/bf16 ] && echo colocated || echo bf16)" --decode http://127.0.0.1:8011 http://127.0.0.1:8012 \
    || status=1
done

python3 - "$out" "$gpus" <<'EOF'
import json, sys
from pathlib import Path

out, gpus = Path(sys.argv[1]), int(sys.argv[2])
print(f"\n{'configuration':<15}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p99':>10}{'out tok/s':>11}{'failed':>8}"
      f"   ({gpus} GPU{'s' if gpus != 1 else ''}{', instances share one' if gpus == 1 else ''})")
for name in ("disaggregated", "colocated", "bf16"):
    path = out / f"serve-{name}.json"
    if not path.is_file():
        print(f"{name:<15}{'(no result)':>10}")
        continue
    s = json.loads(path.read_text())["summary"]
    ms = lambda key: f"{s[key] * 1e3:.1f}ms" if s.get(key) is not None else "n/a"
    print(f"{name:<15}{ms('ttft_p50_s'):>10}{ms('ttft_p99_s'):>10}{ms('itl_p99_s'):>10}"
          f"{s['output_tokens_per_s'] or 0:>11.1f}{s['failed_requests']:>8}")
EOF
exit $status
