# Sourced by the gpu_tests scripts. A device image has torch, triton and transformers, not the rest of what
# `pip install mixquant` brings: xgrammar (every engine warms its masking kernel up), fastapi and uvicorn for the
# server, and the extras (fla-core, cudnn-frontend, nixl). Wheels carried in .carry/<purpose>-wheels/ (pip download
# --no-deps for the device's Python; no package in two folders) go into /tmp/site, on PYTHONPATH after the repository.
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if compgen -G ".carry/*-wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/*-wheels/*.whl >/dev/null ||
    { echo "installing the wheels in .carry/*-wheels failed"; exit 1; }
fi
python3 -c "import xgrammar" 2>/dev/null || echo "xgrammar is not importable, and engines need it: carry" \
  ".carry/structured-wheels (xgrammar, apache-tvm-ffi, pydantic, pydantic-core, annotated-types, typing-inspection)"
# each script's steps: a failing one is reported and the script goes on, exiting 1 at the end (exit $status)
status=0
step() { echo "=== $*"; "$@" || status=1; }
