#!/usr/bin/env bash
# The GPU halves of the benchmarks, prepared for a lent GPU machine with a short lease (two calls, back to back).
#
#   bash benchmarks/gpu_halves.sh timed   NPZ OUT   pipeline + augmenters + every method on the GPU + the CUDA test
#   bash benchmarks/gpu_halves.sh packing NPZ OUT   packing through Ray (Ray and Optuna importable, e.g. from wheels)
#   bash benchmarks/gpu_halves.sh check   NPZ OUT   only the loader tests on CUDA and the augmenter table (with launches)
#
# NPZ is CIFAR-10-LT exported by `python -m benchmarks.export_npz` (the CIFAR batches are larger than a
# transfer allows); `timed` keeps a copy in /tmp so that the `packing` call on the same warm machine can
# use it without carrying it again (else packing falls back to the embedded digits at 32x32).
# Each part runs under its own time limit and a failing part does not stop the others. Output: OUT/*.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=$1 NPZ=$2 OUT=$3
case "$PART" in
  timed|check|packing) ;;
  *) echo "gpu_halves.sh: PART must be 'timed', 'packing' or 'check', got '$PART'" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
KEPT=/tmp/ltsearch-bench/cifar10_lt.npz
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LTSEARCH_CACHE=/tmp/ltsearch-bench/cache
step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: exit $rc"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name(), 'cpus', __import__('os').cpu_count())"

SETS=(--set data.name=npz "data.path=$NPZ" data.imbalance=1)
if [ "$PART" != packing ]; then
  mkdir -p "$(dirname "$KEPT")" && cp "$NPZ" "$KEPT"
  step cuda_test 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_data_loader.py
  step augmenters 150 "$PY" -m benchmarks.augmenters --device cuda --steps 40 --rounds 3 --profile "${SETS[@]}"
fi
if [ "$PART" = timed ]; then
  step pipeline 120 "$PY" -m benchmarks.pipeline --device cuda --steps 200 --rounds 3 --workers 8 "${SETS[@]}"
  step methods 150 "$PY" -m benchmarks.gpu_methods --device cuda --epochs 3 "${SETS[@]}"
fi
if [ "$PART" = packing ]; then
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"  # Ray's trial workers import ltsearch from the repo root
  if [ -f "$KEPT" ]; then
    step packing 420 "$PY" -m benchmarks.packing --config configs/cifar10_lt.yaml --epochs 6 --counts 1 2 4 8 \
      --set data.name=npz "data.path=$KEPT" data.imbalance=1
  else
    step packing 420 "$PY" -m benchmarks.packing --epochs 12 --counts 1 2 4 8
  fi
fi
