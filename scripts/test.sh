#!/usr/bin/env bash
# Sets everything up, then runs the test suite (CPU: Triton interpreter; benchmarks disabled).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q --benchmark-disable "$@"
