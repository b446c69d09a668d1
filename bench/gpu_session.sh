#!/usr/bin/env bash
# One call of a lent GPU machine, from a bare checkout: install fastsd into the machine's python3
# (its CUDA extension built for that GPU only, which is quicker than the full list of setup.py),
# DALI from the parts sent ahead into /tmp/dali-parts (when there), print the versions, then run
# bench/run_all.sh with the given phases.
#
#   bash bench/gpu_session.sh [PHASE ...]     e.g. DEADLINE_S=480 bash bench/gpu_session.sh snapshots dali
#
# Such a machine has no network. Its image pins torch 2.11, which asks for setuptools < 82 and may
# come with one older than the 77 that this project's metadata needs; then the script installs the
# setuptools wheel in .whl/. DALI is not on the image and its wheels (~270 MB) travel in 5 parts.
# `bash bench/prepare_gpu_session.sh` prepares all of it beforehand (git-ignored: .whl/,
# .device-dali/chunk-N/, .data/ with the CIFAR-10 JPEG archive).
#
# The whole session, for a lease of 15 minutes of device time (the start, idle waits and transfers
# count), as calls of the device tool back to back (the machine goes back after 30 s idle):
#   1-4. carry .device-dali/chunk-N (the first call starts the machine):
#        mkdir -p /tmp/dali-parts && cp .device-dali/chunk-N/* /tmp/dali-parts/
#   5.   carry .device-dali/chunk-5, .whl and .data, timeout_s 560:
#        mkdir -p /tmp/dali-parts && cp .device-dali/chunk-5/* /tmp/dali-parts/ &&
#        DEADLINE_S=480 bash bench/gpu_session.sh snapshots dali kernels
#   6.   give_back; unpack what came back (a markdown and a .tar.gz a phase: tar -xzf FILE in
#        the project root puts the phase's files under bench/results/) and commit them (the
#        files name the GPU).
#   With more device time: the train phase (ResNet-50 and ResNet-152 steps), then kernels in full.
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

if [ -z "${FASTSD_CIFAR_JPEG_TAR:-}" ] && [ -f .data/cifar10-jpeg.tar.gz ]; then
  export FASTSD_CIFAR_JPEG_TAR=$PWD/.data/cifar10-jpeg.tar.gz
fi
if compgen -G "/tmp/dali-parts/part-*" >/dev/null && ! $python -c "import nvidia.dali" 2>/dev/null; then
  # the parts are one tar of wheels, cut in order (../shared/tools/device-dali)
  if [ ! -d /tmp/dali-site ]; then
    cat /tmp/dali-parts/part-* | tar -x -C /tmp &&
      $python -m pip install -q --no-index --no-deps --no-compile --target /tmp/dali-site \
        /tmp/wheels/*.whl || echo "DALI did not install from /tmp/dali-parts (a part missing?)" >&2
  fi
  export PYTHONPATH=/tmp/dali-site${PYTHONPATH:+:$PYTHONPATH}
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
try:
    import nvidia.dali as dali
    print('DALI', dali.__version__)
except ImportError:
    print('DALI not installed')
assert ext.built_with_cuda(), 'fastsd._C was built without CUDA'" || exit 1
echo "installed in $((SECONDS - start)) s"

# what the install took comes off the run's deadline
if [ -n "${DEADLINE_S:-}" ]; then export DEADLINE_S=$((DEADLINE_S - (SECONDS - start))); fi
exec bash bench/run_all.sh "$@"
