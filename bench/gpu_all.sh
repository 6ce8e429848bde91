#!/usr/bin/env bash
# The one prepared GPU run (H100/H200): every benchmark, each against its peer, JSON lines into $OUT (or bench_out/).
# Usage on the lent machine: bash bench/gpu_all.sh   (about 8 minutes; each step has its own time limit)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
run() { local name=$1; shift; echo "== $name"; timeout "${LIMIT:-150}" python "$@" --out "$out/$name.json" 2>&1 | tail -n 12; }
run augment   bench/augment.py --device cuda --size 224 --batch 256
run loader    bench/loader.py --device cuda
run byol_step bench/byol_step.py --device cuda --encoder resnet50 --size 224 --batch 256 --steps 20 --warmup 5
LIMIT=240 run byol_step_compiled bench/byol_step.py --device cuda --encoder resnet50 --size 224 --batch 256 --steps 20 --warmup 5 --compile
LIMIT=240 run lm_step bench/lm_step.py --device cuda
run probe bench/probe.py --device cuda --backbone random:resnet50 --image-size 64 --resize 64 --epochs 30
cat "$out"/*.json
