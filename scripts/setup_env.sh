#!/usr/bin/env bash
# Creates .venv (once) and installs flextron with its test extras for a CPU-only machine.
# torch is pinned in the same pip command: an open range would resolve to a 5 GB CUDA build.
# triton 3.6.0 is the GPU machine's version, and it needs numpy < 2.4 (see docs/ENVIRONMENT notes in README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.flextron-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ scripts/setup_env.sh -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check \
    torch==2.13.0 triton==3.6.0 'numpy<2.4' matplotlib -e '.[test]' 2>&1 | grep -v "is ignored: it is neither" || true
  .venv/bin/python -c "import torch, triton, transformers" # fail loudly if the install did not work
  touch "$stamp"
fi
