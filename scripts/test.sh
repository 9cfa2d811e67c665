#!/usr/bin/env bash
# Sets everything up, then runs the test suite (CPU: Triton interpreter; benchmarks disabled) over up to four
# pytest-xdist workers (one per core): about 10 minutes on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1
WORKERS=${FLEXTRON_TEST_WORKERS:-$(.venv/bin/python -c "import os; print(min(4, os.cpu_count() or 1))")}
exec .venv/bin/python -m pytest -q --benchmark-disable -n "$WORKERS" "$@"
