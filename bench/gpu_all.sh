#!/usr/bin/env bash
# The one prepared GPU run (H100/H200): every benchmark against its peer, in priority order, inside one time budget.
#
#   here:       bash bench/gpu_wheels.sh                 (kornia + byol-pytorch wheels into .whl/, the image lacks them)
#   on the GPU: bash bench/gpu_all.sh                    (device run: carry [".whl"], timeout_s >= BUDGET + 40)
#   smoke test: DEVICE=cpu SMOKE=1 bash bench/gpu_all.sh (same plumbing, tiny sizes, ~1 min on 2 cores)
#
# Results: one JSON line per benchmark in $OUT/results.jsonl, the whole console log in $OUT/log.txt (two files: the
# device tool returns at most eight); the log ends with the BENCHMARKS.md rows (bench/to_markdown.py). Each step
# gets its own limit, cut to what is left of BUDGET seconds, so a slow early step cannot starve the call; what a step
# did not finish is logged as "TIMEOUT".
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench_out}; mkdir -p "$out"
budget=${BUDGET:-520}; dev=${DEVICE:-cuda}; smoke=${SMOKE:-0}
start=$SECONDS
log="$out/log.txt"; results="$out/results.jsonl"; : >"$results"; tmp=$(mktemp -d)
exec > >(tee -a "$log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$dev" = cuda ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
python3 - <<'PY'
import importlib
for m in ("torch", "torchvision", "lightning", "timm", "transformers", "kornia", "byol_pytorch"):
    try:
        print(f"{m} {getattr(importlib.import_module(m), '__version__', '?')}")
    except Exception as e:  # a missing peer is reported by its benchmark
        print(f"{m} MISSING ({type(e).__name__})")
PY
step() {  # step NAME LIMIT SCRIPT ARGS...
  local name=$1 limit=$2; shift 2
  local left=$((budget - (SECONDS - start)))
  if [ "$left" -lt 20 ]; then echo "== $name SKIPPED (budget spent)"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s, $((SECONDS - start))s in)"
  timeout -k 5 "$limit" python3 "$@" --out "$tmp/$name.json"; local rc=$?
  if [ -s "$tmp/$name.json" ]; then cat "$tmp/$name.json" >>"$results"
  else echo "{\"bench\": \"$name\", \"error\": \"$([ $rc -eq 124 ] && echo TIMEOUT || echo "exit $rc")\"}" >>"$results"; fi
}
if [ "$smoke" = 1 ]; then
  step augment            120 bench/augment.py --device "$dev" --batch 4 --sizes 64 --iters 2
  step augment_compiled   240 bench/augment.py --device "$dev" --batch 4 --sizes 64 --iters 2 --compile
  step loader             120 bench/loader.py --device "$dev" --images 8 --batch 4 --size 64 --repeats 1
  step decode_ahead        120 bench/decode_ahead.py --device "$dev" --images 16 --batch 4 --size 32 --steps 2 --model tiny
  step byol_step          120 bench/byol_step.py --device "$dev" --encoder resnet18 --size 32 --batch 4 --steps 2 --warmup 1
  step lm_step            120 bench/lm_step.py --small --batch 1 --warmup 1 --rounds 1 --steps 1
  step probe              120 bench/probe.py --device "$dev" --epochs 2
  step probe_scale        240 bench/probe.py --device "$dev" --scale 128 --lr 0.1 0.4 --epochs 1 --batch-size 32 --devices 1 --protocol-n 48 --protocol-epochs 1
else
  step augment             60 bench/augment.py --device "$dev" --batch 256 --sizes 224 96 --iters 10
  step augment_compiled   100 bench/augment.py --device "$dev" --batch 256 --sizes 224 --iters 10 --compile --bf16
  step loader              60 bench/loader.py --device "$dev" --images 1024 --batch 256 --bf16
  # Issue 29: decode: device without the round trip (bytes pinned once, nvjpeg in a side stream one step ahead).
  step decode_ahead        60 bench/decode_ahead.py --device "$dev" --images 640 --batch 128 --size 224
  step byol_step           90 bench/byol_step.py --device "$dev" --encoder resnet50 --size 224 --batch 256 --steps 15 --warmup 5
  step byol_step_compiled 170 bench/byol_step.py --device "$dev" --encoder resnet50 --size 224 --batch 256 --steps 15 --warmup 5 --compile
  step byol_step_whole    170 bench/byol_step.py --device "$dev" --encoder resnet50 --size 224 --batch 256 --steps 15 --warmup 5 --compile step
  step lm_step            120 bench/lm_step.py
  step probe               45 bench/probe.py --device "$dev" --backbone random:resnet50 --image-size 64 --resize 64 --epochs 30
  # Issue 30: extraction img/s into the store, the fast probe's memory, protocol's k-lr grid in one pass vs k passes
  # (one GPU here: --devices 2 needs a two-GPU lease)
  step probe_scale        120 bench/probe.py --device "$dev" --scale 16384 --backbone random:resnet50 --image-size 224 --resize 256 --lr 0.1 0.2 0.4 0.8 --epochs 10 --batch-size 1024 --num-workers 8 --devices 1 --protocol-n 8192 --protocol-epochs 1
  # Issue 18's compile proof (CPU-side: graph breaks, recompiles, host syncs; dynamo's counts need no inductor).
  step graph_breaks       120 bench/graph_breaks.py --backend eager
fi
echo "== done in $((SECONDS - start))s"; cat "$results"; python3 bench/to_markdown.py "$results"; rm -rf "$tmp"
