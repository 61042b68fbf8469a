#!/usr/bin/env bash
# Issue 25, item 4: the calibrated-start uptraining study (configs/calibrated-start.yaml), seed by seed so that
# an interrupted sitting leaves whole seeds; resumable (finished runs are skipped). Then joins the arms:
#   bash bench/calibrated_start.sh            # all three seeds
#   bash bench/calibrated_start.sh 0          # one seed
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=${*:-0 1 2}
for seed in $SEEDS; do
    for arm in "4 calibrated" "2 calibrated" "2 mean"; do
        set -- $arm
        $PY -m gqa_core.train --config configs/calibrated-start.yaml --num-kv-heads "$1" --init "$2" \
            --seeds "$seed" --resume --out "checkpoints/calibrated-start/g$1-$2"
    done
done
