#!/usr/bin/env bash
# Sets everything up, then runs the main job on its embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# On a machine without a GPU the kernels run under the Triton interpreter.
if ! .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export TRITON_INTERPRET=1
fi
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m flextron demo "$@"
