#!/usr/bin/env bash
# GPU smoke run of the whole path: the demo (teacher, then ATSC) in bf16 on one GPU, then ATSC at
# ZeRO-2 and ZeRO-3. Writes the summaries to $OUT (or ./gpu-smoke). Needs the project's
# packages importable; on a bare machine pass wheels in WHEELS=dir (installed to /tmp/site).
set -euo pipefail
OUT=${OUT:-gpu-smoke}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, timm, deepspeed; print('torch', torch.__version__, 'timm', timm.__version__, 'deepspeed', deepspeed.__version__)"
python3 -m shards.digits --out data/digits
launch() { python3 -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no \
             --dynamo_backend no harness/run.py "$@"; }
launch recipes/demo-teacher.yaml --set data.workers=4 2>&1 | tail -n 7
launch recipes/demo.yaml --set data.workers=4 2>&1 | tail -n 8
for stage in 2 3; do
  launch recipes/demo.yaml --set output=runs/demo-zero$stage --set runtime.zero_stage=$stage \
    --set schedule.epochs=4 --set data.workers=4 2>&1 | tail -n 4
done
for run in demo-teacher demo demo-zero2 demo-zero3; do
  cp "runs/$run/summary.json" "$OUT/$run.summary.json"
done
cp runs/demo/metrics.jsonl "$OUT/demo.metrics.jsonl"
