#!/usr/bin/env bash
# One entry point for a fresh machine: set up .venv, then run the demo or the tests.
#   ./dev.sh demo   export the built-in `demo` model and generate a video from its engines
#   ./dev.sh test   run the test suite (what CI runs)
# Setup installs the CPU build of torch where there is no NVIDIA GPU (a bare `torch` would pull several GB of CUDA).
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python

pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored" || true; }

setup() {
  [ -x "$PY" ] || python3 -m venv .venv
  if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      pip_q torch
    elif ! "$PY" -m pip install -q "torch==2.13.0+cpu" >/dev/null 2>&1; then  # a local CPU wheel, if any
      pip_q --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
    fi
  fi
  pip_q -e ".[export,test,bench,kernels,triton]"
  "$PY" -c "import torch, soraedge" || { echo "setup failed: torch or soraedge not importable" >&2; exit 1; }
}

case "${1:-}" in
  demo)
    setup
    mkdir -p out
    .venv/bin/sora-export demo -o engines/demo --overwrite  # engines/demo is this command's own output
    .venv/bin/sora-run --engines engines/demo --prompt "a yellow circle moving left on a black background" \
      -o out/demo.mp4
    ;;
  test)
    setup
    shift
    exec "$PY" -m pytest -q "$@"
    ;;
  *)
    echo "usage: ./dev.sh demo | ./dev.sh test [pytest args]" >&2
    exit 2
    ;;
esac
