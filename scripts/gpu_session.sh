#!/usr/bin/env bash
# What a lent GPU session runs, one part per device call (each under the 10-minute call limit,
# the three within the 30 minutes a session gets). Logs and results go to $OUT (default: gpu_out).
#
#   bash scripts/gpu_session.sh tests       # install + every `gpu` test              (~4 min)
#   bash scripts/gpu_session.sh attention   # install + attention kernels at 64K/128K (~5 min)
#   bash scripts/gpu_session.sh train       # install + training steps, ours vs HF    (~8 min)
#   bash scripts/gpu_session.sh cp          # install + busiest CP rank's attention, old vs new split (~5 min)
#
# Each part installs first (scripts/device_setup.sh, about a minute; a warm machine skips it), so
# a part never depends on an earlier call having run. Carry build/device_wheels (docs/gpu.md).
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: $0 tests|attention|train|cp}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ! python -c "import megatron.core, megatron_prolong" 2>/dev/null; then
  bash scripts/device_setup.sh 2>&1 | tee "$OUT/setup.log" || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1

case "$part" in
  tests)
    timeout 480 python -m pytest -q -m gpu -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml" 2>&1 \
      | tee "$OUT/gpu_tests.log" ;;
  attention)
    timeout 540 python benchmarks/bench_attention.py --seq-lengths 65536 131072 --mixtures prolong single 2>&1 \
      | tee "$OUT/bench_attention.log" ;;
  train)
    timeout 560 python benchmarks/bench_train.py --out "$OUT/bench_train" --max-layers 6 --attempt-predicted-oom \
      --time-budget 420 --job-timeout 150 2>&1 | tee "$OUT/bench_train.log" ;;
  cp)
    timeout 540 python benchmarks/bench_cp_balance.py --seq-lengths 65536 524288 --cp 4 8 16 \
      --mixes prolong short pieces --samples 1 --tile-samples 1 --time-backends flex varlen --iters 2 2>&1 \
      | tee "$OUT/bench_cp_balance.log" ;;
  *)
    echo "unknown part $part: tests, attention, train or cp" >&2; exit 2 ;;
esac
