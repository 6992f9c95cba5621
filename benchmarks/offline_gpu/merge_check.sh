#!/usr/bin/env bash
# The GPU checks of `lors merge --device cuda`, as one run on a lent GPU machine (no network):
#   1. the CUDA tests: a merge on the GPU equals the CPU's within tolerance (5 methods); on a
#      machine without a GPU they are skipped;
#   2. bench_merge.py --device cuda: the I/O floor and each merge on the CPU (that machine's
#      cores) and on the GPU, in the same run, the GPU's peak memory, and how close the GPU's
#      merged LoRS and TIES are to the CPU's.
# Logs go to $OUT (the device tool's folder that comes back), else ./gpu-check.
#
# The machine's python3 has torch, transformers, safetensors, numpy, pyyaml and pytest but no
# pydantic. Here (with a network), in the repository's root, once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5
# then run, through the device tool, with carry [".whl"] and a timeout of about 8 minutes:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \
#     bash benchmarks/offline_gpu/merge_check.sh
# Expected time there: about 1 minute of tests, 3 to 5 of benchmark (6 models of 0.9 GiB written,
# 13 merges).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-$repo/gpu-check}
mkdir -p "$out"
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$repo"
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA device visible"
print("torch", torch.__version__, "on", torch.cuda.get_device_name(), flush=True)'
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv > "$out/gpu.txt" 2>&1 || true
python3 -m pytest -q -p no:cacheprovider -rs -k "cuda or gpu" tests/test_merge_scale.py 2>&1 \
  | tee "$out/cuda_tests.txt"
workdir=$(mktemp -d /tmp/lors-bench-XXXX)
python3 benchmarks/bench_merge.py --device cuda --repeats "${REPEATS:-1}" --workdir "$workdir" \
  2>&1 | grep -v LorsWarning | tee "$out/bench_merge_cuda.txt"
rm -rf "$workdir"
