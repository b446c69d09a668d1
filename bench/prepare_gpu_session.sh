#!/usr/bin/env bash
# Prepares, on the development machine (which has network), what a GPU session sends along to the
# offline GPU machine, all git-ignored: a setuptools wheel in .whl/ (bench/gpu_session.sh), DALI's
# wheels in .device-dali/chunk-N/ (../shared/tools/device-dali) and the CIFAR-10 JPEG archive in
# .data/. Skips what is there already; then prints the calls of the session (gpu_session.sh's
# header), so that none of the lent minutes go to preparation.
#
#   bash bench/prepare_gpu_session.sh
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${FASTSD_SHARED:-../shared}

if ! ls .whl/setuptools-*.whl >/dev/null 2>&1; then
  # torch 2.11 (the GPU machines') asks for setuptools < 82; the project's metadata for >= 77
  python3 -m pip download -q 'setuptools>=77,<82' --no-deps -d .whl
fi
if [ ! -d .device-dali/chunk-1 ]; then
  "$shared/tools/device-dali" prepare >/dev/null
fi
if [ ! -f .data/cifar10-jpeg.tar.gz ]; then
  mkdir -p .data && cp "$shared/datasets/cifar10-jpeg.tar.gz" .data/
fi
du -sh .whl .device-dali/chunk-* .data
echo
echo "The calls of the session (each carry is at most 64 MiB), back to back:"
sed -n '/^# The whole session/,/^#   With more device time/p' bench/gpu_session.sh | sed 's/^# \{0,1\}//'
