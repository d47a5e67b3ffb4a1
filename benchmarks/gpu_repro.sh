#!/usr/bin/env bash
# GPU reproduction of the published CIFAR-10-LT (rho = 100) numbers: ablations/reproduce_cifar10.yaml (the
# baseline and each method at its paper defaults, the full 200-epoch LDAM-DRW recipe) through `ltsearch
# ablate`, every run packed on one GPU (resources.gpu = a fraction), for as long as the budget allows.
#
#   bash benchmarks/gpu_repro.sh [DATA_ROOT] [OUT_DIR] [BUDGET_SECONDS]
#     DATA_ROOT       holds cifar-10-batches-py/            (default ../shared/data)
#     OUT_DIR         the ablation directory + logs          (default runs/gpu_repro-<time>)
#     BUDGET_SECONDS  the ablation is interrupted then; every run keeps its checkpoint (default 540)
#   environment: SEEDS ("[0]"), GPU_FRACTION (0.125: 8 runs at once), CPUS per run (2), ABLATION (the file),
#                EXTRA (overrides for every run), e.g. on a lent device, whose transfer limit the CIFAR-10 batches
#                exceed, the exported split (benchmarks/export_npz.py; val/test capped at 100 per class there):
#                EXTRA="data.name=npz data.path=.bench/cifar10_lt.npz data.imbalance=1"
#                DEVICE=cpu EXTRA="data.max_train_per_class=20 ..." for a smoke test of the script without a GPU
#
# Continue an interrupted reproduction with the same OUT_DIR: runs that ended are kept, the others resume from
# their last checkpoint (`ltsearch ablate --resume OUT_DIR/ablation`). Prints the matrix (test top-1 at each
# run's best-val epoch next to the paper's number; pending runs shown as such) and, for every run, how far it
# got. M2m's g (plain-CE ERM on the same data) is trained at the start, concurrently, into the cache the M2m
# run reads at its deferral epoch, so the M2m run does not wait 200 epochs at T.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA_ROOT=${1:-../shared/data}
OUT=${2:-runs/gpu_repro-$(date +%Y%m%d-%H%M%S)}
BUDGET=${3:-540}
ABLATION=${ABLATION:-ablations/reproduce_cifar10.yaml}
DEVICE=${DEVICE:-cuda}
GPU_FRACTION=${GPU_FRACTION:-0.125}
[ "$DEVICE" = cpu ] && GPU_FRACTION=0
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT"
export LTSEARCH_CACHE="$OUT/cache"
SETS=(--set "data.root=$DATA_ROOT" --set "train.device=$DEVICE" --set "resources.gpu=$GPU_FRACTION"
      --set "resources.cpu=${CPUS:-2}" --set "seeds.train=${SEEDS:-[0]}" --set "tracking.uri=sqlite:///$OUT/mlruns.db")
for item in ${EXTRA:-}; do SETS+=(--set "$item"); done

echo "gpu_repro: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi'), budget ${BUDGET}s, $ABLATION, out $OUT"
start=$(date +%s)

# M2m's g first, in the background, for every train seed: the key the M2m run computes, behind a file lock.
"$PY" - "$ABLATION" "${SETS[@]}" > "$OUT/m2m_g.log" 2>&1 <<'EOF' &
import sys
from ltsearch.ablate.settings import load_ablation
from ltsearch.engine import Trainer
path, sets = sys.argv[1], [value for flag, value in zip(sys.argv[2::2], sys.argv[3::2])]
ablation = load_ablation(path, sets)
for run in ablation.runs:
    if run.point.get("augmenter.name") == "m2m":
        from ltsearch.config import build_run_config
        from ltsearch.space import apply_point
        Trainer(build_run_config(apply_point(ablation.base, run.point))).augmenter.reference()
        print(f"g ready for {run.run_id}", flush=True)
EOF
g_pid=$!

if [ -f "$OUT/ablation/ablation.yaml" ]; then
  command=(.venv/bin/ltsearch ablate --resume "$OUT/ablation")
else
  command=(.venv/bin/ltsearch ablate "$ABLATION" "${SETS[@]}" --out "$OUT/ablation")
fi
timeout --signal=INT --kill-after=60 "$BUDGET" "${command[@]}" > "$OUT/ablate.log" 2>&1
status=$?
kill "$g_pid" 2>/dev/null
elapsed=$(( $(date +%s) - start ))
[ "$status" = 124 ] && echo "budget of ${BUDGET}s reached: the ablation was interrupted (checkpoints kept; rerun with the same OUT_DIR to continue)"
grep -v "^\[" "$OUT/ablate.log" | tail -40

"$PY" - "$OUT/ablation" "$elapsed" <<'EOF'
import json, sys
from pathlib import Path
import pyarrow.parquet as pq
import yaml
root, elapsed = Path(sys.argv[1]), int(sys.argv[2])
print("\n| run | epochs done | best val top-1 so far | test top-1 there | status |\n|---|---|---|---|---|")
for run in sorted((root / "runs").glob("*")):
    planned = yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] if (run / "config.yaml").is_file() else "?"
    history = pq.read_table(run / "history.parquet").to_pylist() if (run / "history.parquet").is_file() else []
    result = json.loads((run / "result.json").read_text()) if (run / "result.json").is_file() else None
    chosen = [row for row in history if row.get("selectable", 1)]
    best = max(chosen, key=lambda row: row.get("val/top1", -1)) if chosen else {}
    status = result["status"] if result else "interrupted"
    print(f"| {run.name} | {len(history)}/{planned} | {best.get('val/top1', float('nan')):.2f} | {best.get('test/top1', float('nan')):.2f} | {status} |")
print(f"\nwall: {elapsed} s")
EOF
