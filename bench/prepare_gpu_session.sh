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

# Each call sends the working tree (tracked and untracked-not-ignored files) with its carries, at
# most 64 MiB in all: checked here, as a call refused for its size costs a lent machine's minutes.
limit=$((64 * 1024 * 1024))
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
chunks=(.device-dali/chunk-*)
too_big=0
for i in "${!chunks[@]}"; do
  carry=("${chunks[$i]}")
  [ "$i" -eq $((${#chunks[@]} - 1)) ] && carry+=(.whl .data)  # the last call's carry
  total=$((tree + $(du -cb "${carry[@]}" | tail -1 | cut -f1)))
  echo "call $((i + 1)): $((total / 1024 / 1024)) MiB (working tree and ${carry[*]})"
  [ "$total" -le "$limit" ] || { echo "  over the 64 MiB a call may send" >&2; too_big=1; }
done
[ "$too_big" -eq 0 ] || exit 1
echo
echo "The calls of the session (each carry is at most 64 MiB), back to back:"
sed -n '/^# The whole session/,/^#   With more device time/p' bench/gpu_session.sh | sed 's/^# \{0,1\}//'
