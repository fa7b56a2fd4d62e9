#!/usr/bin/env bash
# The GPU session's two halves (see benchmarks/gpu_session.py).
#   benchmarks/gpu_session.sh prepare   here, once: Python 3.12 wheels of what the GPU machine's
#                                       image lacks, and bloodmnist, into .gpu/ (git-ignored)
#   benchmarks/gpu_session.sh run ARGS  there: install the wheels, run benchmarks.gpu_session
# The device tool's call:  run(command="benchmarks/gpu_session.sh run --out $OUT", carry=[".gpu"])
set -euo pipefail
cd "$(dirname "$0")/.."
# What the image (PyTorch, transformers, accelerate, safetensors, numpy, scipy, ...) lacks, at the
# versions this project is tested with.
WHEELS="diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
typing-inspection==0.4.5 flwr==1.42.0 certifi==2026.10.19.post1 pycryptodome==3.24.1 cryptography==50.0.2 cffi==2.1.1
pycparser==3.12 grpcio-health-checking==1.81.1 iterators==0.0.2 open-clip-torch==3.3.0
ftfy==6.3.1 wcwidth==0.9.4 tomli==2.5.0 peft==0.21.2 opacus==1.6.0 opt-einsum==3.4.0"
case "${1:-}" in
prepare)
  mkdir -p .gpu/wheels .gpu/datasets
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
  for wheel in $WHEELS; do
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp -d .gpu/wheels "$wheel" \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64
  done
  cp "${FGL_DATASETS:-../shared/datasets}/bloodmnist_28.npz" .gpu/datasets/
  du -sh .gpu
  ;;
run)
  shift
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/fgl-site .gpu/wheels/*.whl
  export PYTHONPATH="/tmp/fgl-site:$PWD" FGL_DATASETS="$PWD/.gpu/datasets" PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  python3 -c 'import torch, diffusers, transformers, flwr; print("torch", torch.__version__,
    "diffusers", diffusers.__version__, "transformers", transformers.__version__,
    "flwr", flwr.__version__)'
  python3 -m benchmarks.gpu_session "$@"
  ;;
*)
  echo "usage: $0 prepare | run --out DIR [--budget-s S] [--smoke] [--parts ...]" >&2
  exit 2
  ;;
esac
