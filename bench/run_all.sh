#!/usr/bin/env bash
# Every GPU test and every benchmark, with the results written under bench/results/ in files named
# after the device (the GPU's name, or "cpu"). Run from the project root after installing it:
#   bash bench/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
device=$($python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu')")
stem=bench/results/$device-$(date +%Y%m%d-%H%M)
mkdir -p bench/results
status=0
if [ "$device" != cpu ]; then
  $python -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$stem-gpu-tests.txt" || status=1
fi
$python -m pytest bench --benchmark-only --benchmark-json="$stem.json" -q -p no:cacheprovider \
  ${BENCH_ARGS:-} 2>&1 | tee "$stem-bench.txt" || status=1
$python bench/report.py "$stem.json" > "$stem.md"
echo "results: $stem.md"
exit $status
