#!/usr/bin/env bash
# One call of a lent GPU machine, from a bare checkout: install fastsd into the machine's python3
# (its CUDA extension built for that GPU only, which is quicker than the full list of setup.py),
# print the versions, then run bench/run_all.sh with the given phases.
#
#   bash bench/gpu_session.sh [PHASE ...]        e.g. DEADLINE_S=480 bash bench/gpu_session.sh core train
#
# Such a machine has no network. Its image pins torch 2.11, which asks for setuptools < 82 and may
# come with one older than the 77 that this project's metadata needs; then the script installs a
# setuptools wheel from .whl/, which the caller fetches beforehand and sends along (the device
# tool's carry):  pip download 'setuptools>=77,<82' --no-deps -d .whl
#
# The whole session, as calls of the device tool back to back (the machine goes back when idle):
#   1. carry .whl and .device-dali/chunk-1:
#        mkdir -p /tmp/dali-parts && cp .device-dali/chunk-1/* /tmp/dali-parts/ &&
#        DEADLINE_S=360 bash bench/gpu_session.sh core
#   2-4. carry .device-dali/chunk-N: mkdir -p /tmp/dali-parts && cp .device-dali/chunk-N/* /tmp/dali-parts/
#   5. carry .device-dali/chunk-5 and .data (cifar10-jpeg.tar.gz, copied from ../shared/datasets):
#        the same copy, and cp .data/cifar10-jpeg.tar.gz /tmp/
#   6. the install line ../shared/tools/device-dali prints, then
#        FASTSD_CIFAR_JPEG_TAR=/tmp/cifar10-jpeg.tar.gz DEADLINE_S=240 bash bench/run_all.sh dali
#   7. if time is left: bash bench/run_all.sh train
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
start=$SECONDS

if ! $python -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)"; then
  wheels=(.whl/setuptools-*.whl)
  if [ ! -e "${wheels[0]}" ]; then
    echo "setuptools < 77 here and no wheel in .whl/: run pip download 'setuptools>=77,<82'" \
         "--no-deps -d .whl beside the checkout and carry .whl" >&2
    exit 1
  fi
  $python -m pip install -q --no-deps --no-index "${wheels[0]}" || exit 1
fi

arch=$($python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || {
  echo "no CUDA GPU visible to torch: this script is for the GPU machine (bench/run_all.sh runs" \
       "the CPU benchmarks)" >&2
  exit 1
}
# FASTSD_BUILD=cuda: a build that cannot find the toolkit fails here, instead of falling back to
# a CPU-only extension whose CUDA tests would all fail later in the session
FASTSD_BUILD=cuda TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  $python -m pip install -q --no-deps --no-build-isolation -e . || exit 1
$python -c "
import numpy, setuptools, torch, triton, fastsd._C as ext
print('torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__,
      '| setuptools', setuptools.__version__, '|', torch.cuda.get_device_name(),
      '| fastsd._C with CUDA:', ext.built_with_cuda())
assert ext.built_with_cuda(), 'fastsd._C was built without CUDA'" || exit 1
echo "installed in $((SECONDS - start)) s"

# what the install took comes off the run's deadline
if [ -n "${DEADLINE_S:-}" ]; then export DEADLINE_S=$((DEADLINE_S - (SECONDS - start))); fi
exec bash bench/run_all.sh "$@"
