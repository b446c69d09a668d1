#!/usr/bin/env bash
# GPU tests and benchmarks, with the results written under bench/results/ in files named after the
# device (the GPU's name, or "cpu") and the phase. Run from the project root after installing it.
#
#   bash bench/run_all.sh [PHASE ...]       PHASE: snapshots, kernels, core (the two), train, dali,
#                                           all (the default: snapshots kernels train dali)
#
#   snapshots  GPU tests of the snapshot store; its benchmark (pack_tensors CUDA kernel, copy
#          bandwidth, teacher forward)
#   kernels  GPU tests of the loss kernels, trainer and torch data path; loss benchmarks (Triton
#          kernels against the eager and the compiled reference)
#   train  training-step benchmarks: SD vs BL on ResNet-50, then ResNet-152 (AMP, channels_last,
#          compiled), DDP scaling (needs 2+ GPUs)
#   dali   GPU tests and the loader benchmark of the DALI pipelines (DALI must be importable), then
#          the images/s a ResNet-50 step consumes, in the same process so that its row carries the
#          ratio of the mixed pipeline's rate to it
#
# Every pytest call is time-boxed on its own (CALL_TIMEOUT seconds, default 240; the compiled
# ResNet steps get twice that) and writes its own files, so that one call of a lent GPU machine
# (at most 10 minutes) returns what finished even when something hangs or runs long. DEADLINE_S
# bounds the whole script as well: each call gets at most what is left of it (less a margin to
# publish), and calls that would get under 20 s are skipped and say so. The calls run in order of
# importance (GPU tests first). When $OUT is set (the device tool), the phase's markdown and a
# tar of all its files (logs, JSON) are copied there too. Without the CIFAR archive beside the checkout, set
# FASTSD_CIFAR_JPEG_TAR to it (those cases skip otherwise).
set -uo pipefail
cd "$(dirname "$0")/.."
phases=()
for phase in "${@:-all}"; do  # checked before anything runs: a typo must not cost a lent machine
  case $phase in
    all) phases+=(snapshots kernels train dali) ;;
    core) phases+=(snapshots kernels) ;;
    snapshots|kernels|train|dali) phases+=("$phase") ;;
    *) echo "unknown phase $phase (snapshots, kernels, core, train, dali, all)" >&2; exit 2 ;;
  esac
done
python=${PYTHON:-python3}
limit=${CALL_TIMEOUT:-240}
deadline=$((SECONDS + ${DEADLINE_S:-1000000}))
export PYTHONUNBUFFERED=1
device=$($python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu')") || exit 1
mkdir -p bench/results
status=0

publish() {  # publish STEM: the phase's markdown from its JSON files so far, and to $OUT
  local stem=$1
  local jsons=("$stem"-*.json)
  if [ -e "${jsons[0]}" ]; then  # whole or not at all: an earlier call's markdown stays
    if $python bench/report.py "${jsons[@]}" > "$stem.md.tmp"; then mv "$stem.md.tmp" "$stem.md"
    else rm -f "$stem.md.tmp"; echo "bench/report.py failed on ${jsons[*]}" >&2; status=1; fi
  fi
  # after every call, not once at the end: a device call cut short still returns what finished.
  # Two files a phase (the device tool returns 8 a call): its markdown, and everything in a tar.
  if [ -n "${OUT:-}" ]; then
    [ -e "$stem.md" ] && cp "$stem.md" "$OUT"/
    tar -czf "$OUT/$(basename "$stem").tar.gz" "$stem"* 2>/dev/null
  fi
  return 0
}

timed() {  # timed SECONDS LOG COMMAND...: COMMAND in its time box, its output appended to LOG
  local seconds=$1 log=$2 rc
  shift 2
  # SIGINT, not TERM: pytest then ends its session, and pytest-benchmark writes its JSON with
  # what finished (a TERM loses all of it); KILL 15 s later if that hangs
  timeout -s INT -k 15 "$seconds" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "timed out after ${seconds}s (CALL_TIMEOUT / DEADLINE_S): $*" | tee -a "$log"
  fi
  [ "$rc" -eq 0 ] || status=1
}

budget() {  # budget SECONDS: the call's time box, cut to what DEADLINE_S leaves (0: skip it)
  local left=$((deadline - SECONDS - 15))
  if [ "$left" -lt 20 ]; then echo 0; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}

# pytest-xdist, where installed, spreads a file's GPU tests over 4 processes: the loss tests
# compile over a hundred kernel variants into an empty Triton cache
parallel=()
$python -c "import xdist" 2>/dev/null && parallel=(-n 4)

gpu_tests() {  # gpu_tests STEM TEST_FILE... [PYTEST_ARGS]
  local stem=$1 seconds
  shift
  [ "$device" = cpu ] && return
  seconds=$(budget "$limit")
  if [ "$seconds" -eq 0 ]; then echo "skipped (DEADLINE_S): GPU tests $*" | tee -a "$stem-gpu-tests.txt"; return; fi
  timed "$seconds" "$stem-gpu-tests.txt" $python -m pytest "$@" -m gpu -q -p no:cacheprovider -rs
  publish "$stem"
}

bench() {  # bench STEM PART SECONDS PYTEST_ARGS...
  local stem=$1 part=$2 seconds
  seconds=$(budget "$3")
  shift 3
  if [ "$seconds" -eq 0 ]; then echo "skipped (DEADLINE_S): $part" | tee -a "$stem-bench.txt"; return; fi
  # shellcheck disable=SC2086
  timed "$seconds" "$stem-bench.txt" $python -m pytest "$@" --benchmark-only \
    --benchmark-max-time=0.5 --benchmark-json="$stem-$part.json" -q -p no:cacheprovider -rs \
    ${BENCH_ARGS:-}
  publish "$stem"
}

for phase in "${phases[@]}"; do
  stem=bench/results/$device-$phase-$(date +%Y%m%d-%H%M)
  case $phase in
    snapshots)
      gpu_tests "$stem" tests/test_snapshots.py
      bench "$stem" snapshots "$limit" bench/bench_snapshots.py ;;
    kernels)
      # one time box each: the loss and trainer tests compile many kernels and models, and one
      # running long must not cost the others their run
      gpu_tests "$stem" tests/test_data.py
      gpu_tests "$stem" tests/test_loss.py "${parallel[@]}"
      gpu_tests "$stem" tests/test_train_loop.py
      bench "$stem" loss "$limit" bench/bench_loss.py -k "not compiled_reference"
      bench "$stem" loss-compiled "$limit" bench/bench_loss.py -k compiled_reference ;;
    train)
      bench "$stem" step-cpu "$limit" bench/bench_train.py -k "sd_over_bl_cpu and none"
      bench "$stem" step-resnet50 $((2 * limit)) bench/bench_train.py -k "gpu and resnet50"
      bench "$stem" step-resnet152 $((2 * limit)) bench/bench_train.py -k "gpu and resnet152"
      bench "$stem" ddp "$limit" bench/bench_ddp.py ;;
    dali)
      # DALI is not on the GPU image: without it (and nvImageCodec, its GPU decoder) every case
      # below would skip and the phase would look green
      if ! $python -c "import nvidia.dali.backend as b; assert b.GetNvimgcodecVersion() > 0"; then
        echo "DALI with nvImageCodec is not importable: install it first (../shared/tools/device-dali)" \
          | tee -a "$stem-gpu-tests.txt"; status=1; publish "$stem"; continue
      fi
      gpu_tests "$stem" tests/test_dali.py
      bench "$stem" data "$limit" bench/bench_data.py ;;
  esac
  if [ -e "$stem.md" ]; then echo "results: $stem.md"; else echo "no results for $phase"; fi
done
exit $status
