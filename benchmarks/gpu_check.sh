#!/usr/bin/env bash
# One call on a CUDA machine: install (no deps: keep the machine's torch/triton), run the whole test suite
# on CUDA with the interpreter off, then every benchmark. Results land in $OUT (device tool) or
# benchmarks/results/. Usage: bash benchmarks/gpu_check.sh [tests|bench|all] [filter]
#        (bench: a substring of the benchmarks' file names; tests: test files or node ids, in place of the whole suite)
#        bash benchmarks/gpu_check.sh explore "<benchmarks/lab/explore_nested_mlp.py arguments>"  (the CUDA suite, then
#        the nested_mlp variant sweep; its table of variant / base times at the end, report.py)
#        bash benchmarks/gpu_check.sh budgets  (per-request budgets only: their CUDA tests, the end-to-end budgets
#        rows of the three shapes with the per-run and decode-policy A/Bs, started within E2E_LIMIT seconds (360),
#        and the eager decode step's host profile with its variants)
#        bash benchmarks/gpu_check.sh host  (host time of eager calls: the decode and launcher CUDA tests, the launch
#        lab, the budgets prefill profile with its one-batch variants, then the eager decode-policy A/B rows of
#        bench_end_to_end merged into a copy of the committed results file)
# Result files are named by commit: where the machine's copy of .git may be stale (the device tool copies the
# working tree), pass FLEXTRON_COMMIT=<short sha> in the environment; the benchmarks prefer it to git.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
FILTER=${2:-}
OUTDIR=${OUT:-benchmarks/results}
LOGDIR=${OUT:-${TMPDIR:-/tmp}}  # logs stay out of benchmarks/results (results files only)
mkdir -p "$OUTDIR" "$LOGDIR"
unset TRITON_INTERPRET
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
# The device has no network: no build isolation; PYTHONPATH above covers an install that fails.
$PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed; using PYTHONPATH"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
status=0
# Triton compiles each kernel variant the tests touch (minutes in one process): spread over processes.
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
if [ "$MODE" = all ] || [ "$MODE" = tests ] || [ "$MODE" = explore ]; then
  # -v: each test's outcome is in the log as it finishes, so a run cut short still names its failures.
  TESTS=""
  [ "$MODE" = tests ] && TESTS=$FILTER
  # shellcheck disable=SC2086  # the test paths are meant to split
  $PY -m pytest -v $XDIST --benchmark-disable -p no:cacheprovider -rfE $TESTS > "$LOGDIR/pytest_cuda.log" 2>&1
  status=$?
  grep -E "(FAILED|ERROR) tests/" "$LOGDIR/pytest_cuda.log" | sed 's/^\[gw[0-9]*\] \[ *[0-9]*%\] //' | sort -u
  tail -3 "$LOGDIR/pytest_cuda.log"
fi
if [ "$MODE" = budgets ]; then
  $PY -m pytest -q $XDIST --benchmark-disable -p no:cacheprovider -rfE tests/test_model_budgets.py \
    > "$LOGDIR/pytest_budgets.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)" "$LOGDIR/pytest_budgets.log"
  tail -1 "$LOGDIR/pytest_budgets.log"
  # rows not started within E2E_LIMIT seconds are skipped (listed in the file), leaving the profile its time
  $PY benchmarks/bench_end_to_end.py --out "$OUTDIR" --merge --shapes llama2-7b,llama3-8b,llama-1b \
    --providers fm-budgets --modes eager,graph --batches 16 --new-tokens 64 --time-limit "${E2E_LIMIT:-360}" \
    || status=1
  $PY benchmarks/lab/profile_budgets_decode.py --layers 8 --top 25 --variants masked-mlp,masked-attn,masked \
    2>&1 | tee "$LOGDIR/profile_budgets_decode.log" | head -40
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
if [ "$MODE" = host ]; then
  $PY -m pytest -q $XDIST --benchmark-disable -p no:cacheprovider -rfE tests/test_launch.py \
    tests/test_elastic_attention.py -k "decode or launch" > "$LOGDIR/pytest_host.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)" "$LOGDIR/pytest_host.log"
  tail -1 "$LOGDIR/pytest_host.log"
  $PY benchmarks/lab/launch_overhead.py --out "$OUTDIR" || status=1
  $PY benchmarks/lab/profile_budgets_prefill.py --variants attn-one-batch,mlp-one-batch --top 25 \
    2>&1 | tee "$LOGDIR/profile_budgets_prefill.log" | head -45
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  if [ "$OUTDIR" != benchmarks/results ]; then  # --merge adds the rows to the committed file's copy
    cp benchmarks/results/end_to_end_*.json "$OUTDIR"/ 2>/dev/null
  fi
  $PY benchmarks/bench_end_to_end.py --out "$OUTDIR" --merge --shapes llama3-8b,llama-1b --providers fm-budgets \
    --phases decode --modes eager --batches 16 --new-tokens 64 --time-limit "${E2E_LIMIT:-300}" || status=1
fi
if [ "$MODE" = explore ]; then
  # shellcheck disable=SC2086  # the arguments are meant to split
  $PY benchmarks/lab/explore_nested_mlp.py $FILTER --out "$OUTDIR" 2>&1 | tee "$LOGDIR/explore.log" | grep -v "^{"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  # shellcheck disable=SC2012  # the newest sweep file
  $PY benchmarks/report.py "$(ls -t "$OUTDIR"/nested_mlp_explore_*.json | head -1)"
fi
if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
  for b in benchmarks/bench_*.py; do
    case "$b" in *"$FILTER"*) ;; *) continue ;; esac
    echo "== $b"
    $PY "$b" --out "$OUTDIR" || status=1
  done
fi
exit $status
