#!/usr/bin/env bash
# Train mixquant-tiny on one GPU, then measure it, in one device call:
#   bash gpu_tests/train_tiny.sh OUT_DIR [MINUTES] [INIT_FROM]
# OUT_DIR/tiny.tar.part-* hold the checkpoint and every result (split for the device tool's 16 MiB file limit);
# join them with `cat OUT_DIR/tiny.tar.part-* | tar x`. INIT_FROM=mixquant/tiny/checkpoint continues from the
# bundled weights (they travel with the repository). Environment: TRAIN_ARGS (extra training/train.py flags),
# EVAL=0 (train only), EVAL_TIMEOUT, FIDELITY=0, FIDELITY_TIMEOUT, TASK_COUNT. Keep training minutes + timeouts
# under ~9 minutes.
# The fidelity step scores arithmetic with math-verify, which the device image lacks: carry
# .carry/math-verify-wheels (math_verify, latex2sympy2_extended, antlr4_python3_runtime).
set -uo pipefail
out=${1:?usage: train_tiny.sh OUT_DIR [MINUTES] [INIT_FROM]}
minutes=${2:-6}
init=${3:-}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
work=/tmp/tiny && rm -rf $work && mkdir -p $work $out
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
pack() { (cd $work && tar cf - . | split -b 15M - "$out/tiny.tar.part-"); }
python3 -m training.train --output-dir $work/checkpoint --minutes "$minutes" ${init:+--init-from "$init"} ${TRAIN_ARGS:-} \
  2>&1 | tee $work/train.log || { echo "=== training failed: nothing to measure"; pack; exit 1; }
[ "${EVAL:-1}" = 1 ] || { pack; exit 0; }
pack  # the checkpoint is safe even if a measurement below runs out of time
# timeout exits 124 when it stops a command: say so, since a stopped measurement writes nothing
said() {  # exit status, what ran, its timeout
  case $1 in 0) ;; 124) echo "=== $2 stopped by its ${3}s timeout: no result" ;; *) echo "=== $2 failed (exit $1)" ;; esac
}
timeout ${EVAL_TIMEOUT:-120} python3 -m training.evaluate $work/checkpoint --count 200 --output $work/heldout-bf16.json \
  > $work/heldout.log 2>&1; said $? "held-out evaluation" ${EVAL_TIMEOUT:-120}; tail -20 $work/heldout.log
if [ "${FIDELITY:-1}" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/math-verify .carry/math-verify-wheels/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/math-verify || echo "=== no .carry/math-verify-wheels: fidelity will fail"
  timeout ${FIDELITY_TIMEOUT:-200} python3 -m mixquant.cli fidelity $work/checkpoint --tasks tiny --task-count ${TASK_COUNT:-50} \
    --output-dir $work/fidelity-gpu > $work/fidelity.log 2>&1
  said $? fidelity ${FIDELITY_TIMEOUT:-200}; tail -40 $work/fidelity.log
fi
rm -f "$out"/tiny.tar.part-* && pack
ls -la $out
