#!/usr/bin/env bash
# GPU tests and benchmarks, with the results written under bench/results/ in files named after the
# device (the GPU's name, or "cpu") and the phase. Run from the project root after installing it.
#
#   bash bench/run_all.sh [PHASE ...]       PHASE: core, train, dali, all (the default: all three)
#
#   core   GPU tests of the loss kernels, snapshots, trainer and torch data path; loss and snapshot
#          benchmarks (Triton kernels, pack_tensors CUDA kernel, copy bandwidth)
#   train  training-step benchmarks: SD vs BL on ResNet-50/152 (AMP, channels_last, compiled),
#          ResNet-50 step images/s (what a data pipeline must deliver), DDP scaling (needs 2+ GPUs)
#   dali   GPU tests and the loader benchmark of the DALI pipelines (DALI must be importable)
#
# Each phase is time-boxed (PHASE_TIMEOUT seconds per pytest call, default 240) so that one call of
# the lent GPU machine (at most 10 minutes) returns results even when something hangs. When $OUT is
# set (the device tool), the results are copied there too. Without the CIFAR archive beside the
# checkout, set FASTSD_CIFAR_JPEG_TAR to it (the CIFAR benchmarks and tests skip otherwise).
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
limit=${PHASE_TIMEOUT:-240}
export PYTHONUNBUFFERED=1
device=$($python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu')") || exit 1
mkdir -p bench/results
status=0
phases=("$@")
[ ${#phases[@]} -eq 0 ] || [ "${phases[0]}" = all ] && phases=(core train dali)

run_phase() {  # run_phase NAME "GPU TEST FILES" BENCH PYTEST ARGS...
  local name=$1 tests=$2
  shift 2
  local stem=bench/results/$device-$name-$(date +%Y%m%d-%H%M)
  if [ "$device" != cpu ] && [ -n "$tests" ]; then
    # shellcheck disable=SC2086
    timeout "$limit" $python -m pytest $tests -m gpu -q -p no:cacheprovider -rs 2>&1 \
      | tee "$stem-gpu-tests.txt" || status=1
  fi
  # shellcheck disable=SC2086
  timeout "$limit" $python -m pytest "$@" --benchmark-only --benchmark-max-time=0.5 \
    --benchmark-json="$stem.json" -q -p no:cacheprovider -rs ${BENCH_ARGS:-} 2>&1 \
    | tee "$stem-bench.txt" || status=1
  [ -s "$stem.json" ] && $python bench/report.py "$stem.json" > "$stem.md"
  echo "results: $stem.*"
  if [ -n "${OUT:-}" ]; then cp "$stem"* "$OUT"/ 2>/dev/null; fi
}

for phase in "${phases[@]}"; do
  case $phase in
    core)  run_phase core "tests/test_loss.py tests/test_snapshots.py tests/test_train_loop.py tests/test_data.py" \
             bench/bench_loss.py bench/bench_snapshots.py ;;
    train) run_phase train "" bench/bench_train.py bench/bench_ddp.py bench/bench_data.py \
             -k "train_step or sd_over_bl or ddp" ;;
    dali)  run_phase dali "tests/test_dali.py" bench/bench_data.py -k "not train_step" ;;
    *) echo "unknown phase $phase (core, train, dali, all)"; exit 2 ;;
  esac
done
exit $status
