#!/usr/bin/env bash
# What a lent GPU session runs (docs/gpu.md). A drawn task gets 15 minutes of device time in all,
# machine start included, so everything is one call of at most 8 minutes:
#
#   bash scripts/gpu_session.sh all             # install, gpu tests, attention kernels at 64K, bench_train at 64K
#   bash scripts/gpu_session.sh all --dry-run   # print the parts, their budgets and what each writes; run nothing
#
# With a longer lease, one part per call (each installs first, so no call depends on an earlier one):
#
#   bash scripts/gpu_session.sh tests | attention | train | cp   [--dry-run]
#   (cp: the busiest CP rank's attention time, old vs balanced split, 64K and 512K, CP 4-16)
#
# Every part runs under its own time budget (coreutils timeout) and writes to $OUT (default gpu_out)
# as it goes, so a part that runs out of time still leaves what it finished: test results one line
# per test (pytest -v, one run per file, a per-test timeout), benchmark rows as they are measured.
# $OUT/session.txt gets one line per part (and per test file): budget, seconds used, exit status
# (124: out of time). The device tool brings back at most 8 files from $OUT: this writes 8.
# Carry build/device_wheels (scripts/device_setup.sh says how to make it).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
dry_run=0
[[ ${2:-} == --dry-run ]] && dry_run=1
OUT=${OUT:-gpu_out}
PYTHON=${PYTHON:-python3}  # the device image's python3 holds its torch
export PYTHONUNBUFFERED=1

# Test files, the most telling first: where the budget ends, the rest are reported as not run.
TEST_FILES=(
  tests/parallel/test_cuda_paths.py            # the TE (THD) batches on CUDA, the loss head without host syncs
  tests/training/test_checkpoint_staging.py    # a save stages the optimizer state in pinned host memory
  tests/parallel/test_cross_entropy_main_grad.py
  tests/attention/test_flex_compile.py         # flex compiles at most twice over lengths (inductor)
  tests/attention/test_kernels_gpu.py          # flex / varlen / fa4 against an fp32 reference
  tests/training/test_gpu_training.py          # bf16 training, exact resume, host syncs per step
  tests/training/test_nonfinite_steps.py
  tests/training/test_async_checkpoint.py
  tests/eval/test_parity.py
  tests/convert/test_extra_state.py            # TE only (skips without it)
)
PER_TEST_TIMEOUT=150  # seconds; the training tests spawn a process per run

case "$mode" in
  all)       parts=(setup tests attention train); budgets=(75 140 90 165) ;;
  tests)     parts=(setup tests);     budgets=(75 480) ;;
  attention) parts=(setup attention); budgets=(75 480) ;;
  train)     parts=(setup train);     budgets=(75 480) ;;
  cp)        parts=(setup cp);        budgets=(75 480) ;;
  *) echo "usage: $0 all|tests|attention|train|cp [--dry-run]" >&2; exit 2 ;;
esac

attention_cmd() {
  if [[ $mode == all ]]; then
    echo "$PYTHON benchmarks/bench_attention.py --seq-lengths 65536 --mixtures prolong single"
  else
    echo "$PYTHON benchmarks/bench_attention.py --seq-lengths 65536 131072 --mixtures prolong short single"
  fi
}

train_cmd() {  # $1: the part's budget; bench_train stops starting rows 30 s before it ends
  if [[ $mode == all ]]; then
    echo "$PYTHON benchmarks/bench_train.py --out $OUT/bench_train --seq-lengths 65536 --max-layers 4 --steps 2" \
         "--time-budget $(($1 - 30)) --job-timeout 80"
  else
    echo "$PYTHON benchmarks/bench_train.py --out $OUT/bench_train --max-layers 6 --attempt-predicted-oom" \
         "--time-budget $(($1 - 60)) --job-timeout 150"
  fi
}

cp_cmd() {
  echo "$PYTHON benchmarks/bench_cp_balance.py --seq-lengths 65536 524288 --cp 4 8 16" \
       "--mixes prolong short pieces --samples 1 --tile-samples 1 --time-backends flex varlen --iters 2"
}

describe() {  # $1 part, $2 budget
  case "$1" in
    setup) echo "install the project from build/device_wheels unless it imports (scripts/device_setup.sh), nvidia-smi"
           echo "    writes: $OUT/setup.log" ;;
    tests) echo "pytest -m gpu -v --timeout $PER_TEST_TIMEOUT, one run per file, in this order, while the budget lasts:"
           printf '      %s\n' "${TEST_FILES[@]}"
           echo "    writes: $OUT/tests.log (a line per test as it ends, then each file's summary)" ;;
    attention) echo "$(attention_cmd)"
           echo "    writes: $OUT/attention.log (a table row per kernel and mixture as measured)" ;;
    cp) echo "$(cp_cmd)"
           echo "    writes: $OUT/cp.log (balance, tiles and the busiest rank's attention time per row)" ;;
    train) echo "$(train_cmd "$2")"
           echo "    writes: $OUT/train.log (progress, table), $OUT/bench_train/bench_train.{json,csv,log} (after each row)" ;;
  esac
}

if [[ $dry_run == 1 ]]; then
  total=0
  echo "gpu_session.sh $mode: ${#parts[@]} parts, \$OUT=$OUT (every part also appends to $OUT/session.txt)"
  for i in "${!parts[@]}"; do
    echo "[${parts[$i]}] budget ${budgets[$i]} s"
    echo "    $(describe "${parts[$i]}" "${budgets[$i]}")"
    total=$((total + budgets[i]))
  done
  echo "total budget ${total} s ($((total / 60)) min $((total % 60)) s)"
  exit 0
fi

mkdir -p "$OUT"
now() { date +%s; }
record() { echo "$*" | tee -a "$OUT/session.txt"; }

run_setup() {  # $1 budget
  {
    if "$PYTHON" -c "import megatron.core, megatron_prolong" 2>/dev/null; then
      echo "[setup] already installed"
    else
      PYTHON=$PYTHON timeout -k 5 "$1" bash scripts/device_setup.sh
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  } >> "$OUT/setup.log" 2>&1
}

run_tests() {  # $1 budget; returns 124 if the budget ran out, else pytest's worst exit status
  local deadline=$(($(now) + $1)) file left start rc worst=0 result
  for file in "${TEST_FILES[@]}"; do
    left=$((deadline - $(now)))
    if ((left < 20)); then
      record "  tests $file: not run (budget spent)"
      worst=124
      continue
    fi
    start=$(now)
    timeout -k 5 "$left" "$PYTHON" -m pytest -m gpu -v -rs -p no:cacheprovider --timeout "$PER_TEST_TIMEOUT" \
      --timeout-method=signal "$file" >> "$OUT/tests.log" 2>&1
    rc=$?
    if ((rc == 124 || rc == 137)); then
      result="out of budget; the tests it finished are in tests.log"
      worst=124
    else
      result=$(tail -n 1 "$OUT/tests.log" | tr -d '=' | xargs)  # pytest's summary line
      ((rc > worst && worst != 124)) && worst=$rc
    fi
    record "  tests $file: exit $rc in $(($(now) - start)) s ($result)"
  done
  return "$worst"
}

run_attention() {  # $1 budget
  timeout -k 5 "$1" $(attention_cmd) >> "$OUT/attention.log" 2>&1
}

run_cp() {  # $1 budget
  timeout -k 5 "$1" $(cp_cmd) >> "$OUT/cp.log" 2>&1
}

run_train() {  # $1 budget
  timeout -k 10 "$1" $(train_cmd "$1") >> "$OUT/train.log" 2>&1
}

record "gpu_session.sh $mode on $(hostname), $(date -u +%FT%TZ)"
for i in "${!parts[@]}"; do
  p=${parts[$i]} b=${budgets[$i]}
  start=$(now)
  "run_$p" "$b"
  rc=$?
  record "[$p] budget $b s, used $(($(now) - start)) s, exit $rc"
  if [[ $p == setup && $rc != 0 ]]; then
    record "setup failed: see $OUT/setup.log"; exit 1
  fi
done

echo "---- summary"
cat "$OUT/session.txt"
[[ -f $OUT/tests.log ]] && grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | tail -n 20
[[ -f $OUT/attention.log ]] && tail -n 12 "$OUT/attention.log"
[[ -f $OUT/train.log ]] && tail -n 15 "$OUT/train.log"
[[ -f $OUT/cp.log ]] && tail -n 30 "$OUT/cp.log"
exit 0
