#!/usr/bin/env bash
# Train mixquant-tiny on one GPU, then measure it, in one device call:
#   bash gpu_tests/train_tiny.sh OUT_DIR [MINUTES] [INIT_FROM]
# OUT_DIR/tiny.tar.part-* hold the checkpoint and every result (split for the device tool's 16 MiB file limit);
# join them with `cat OUT_DIR/tiny.tar.part-* | tar x`. INIT_FROM=mixquant/tiny/checkpoint continues from the
# bundled weights (they travel with the repository). Environment: TRAIN_ARGS (extra train.py flags), EVAL=0 (train
# only), EVAL_TIMEOUT, FIDELITY=0, FIDELITY_TIMEOUT, TASK_COUNT. Keep training minutes + timeouts under ~9 minutes.
set -uo pipefail
out=${1:?usage: train_tiny.sh OUT_DIR [MINUTES] [INIT_FROM]}
minutes=${2:-6}
init=${3:-}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
work=/tmp/tiny && rm -rf $work && mkdir -p $work $out
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m mixquant.tiny.train --output-dir $work/checkpoint --minutes "$minutes" ${init:+--init-from "$init"} ${TRAIN_ARGS:-} \
  2>&1 | tee $work/train.log
pack() { (cd $work && tar cf - . | split -b 15M - "$out/tiny.tar.part-"); }
[ "${EVAL:-1}" = 1 ] || { pack; exit 0; }
pack  # the checkpoint is safe even if a measurement below runs out of time
timeout ${EVAL_TIMEOUT:-120} python3 -m mixquant.tiny.evaluate $work/checkpoint --count 200 --output $work/heldout-bf16.json \
  2>&1 | tee $work/heldout.log
[ "${FIDELITY:-1}" = 1 ] && timeout ${FIDELITY_TIMEOUT:-200} python3 -m mixquant.cli fidelity $work/checkpoint --tasks tiny --task-count ${TASK_COUNT:-50} --max-tokens 200 \
  --output-dir $work/fidelity-gpu 2>&1 | tail -40
rm -f "$out"/tiny.tar.part-* && pack
ls -la $out
