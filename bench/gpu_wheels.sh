#!/usr/bin/env bash
# Fetch, on the development machine, the peers that the GPU image lacks (it has torch, torchvision, lightning, timm
# and transformers, but no kornia and no byol-pytorch, and it cannot reach a package index). The wheels land in .whl/
# (git-ignored); bench/gpu_all.sh installs them on the device when the run carries .whl.
#   bash bench/gpu_wheels.sh     then: device run with carry [".whl"], command "bash bench/gpu_all.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl kornia==0.9.0 kornia_rs==0.2.0 byol-pytorch==0.9.1 beartype==0.23.1
ls -l .whl
