#!/usr/bin/env bash
# Accuracy of the methods side by side on real data: ResNet-20 on the CIFAR-10 JPEGs, one run per
# method with the same budget (EPOCHS in all; SE and SD in CYCLES cycles), then python -m
# fastsd.report over them. The results of a run on this project's machines are in
# bench/results/<device>-cifar10-methods.md.
#
#   bash bench/cifar10_methods.sh [METHOD ...]      METHOD: sd, se, bl (default: all three)
#
# Settings (environment): EPOCHS (30), CYCLES (3), SEEDS ("0"; several give the report's mean ±
# std table), ARGS (more fastsd.train flags, e.g. "--device cuda --compile"), OUT (the runs'
# folder, default runs/cifar10-methods). The CIFAR-10 archive is looked for in ../shared/datasets/
# (FASTSD_CIFAR_JPEG_TAR=PATH points elsewhere) and extracted into a temporary folder. A finished
# run is kept; a killed one resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
tar_file=${FASTSD_CIFAR_JPEG_TAR:-../shared/datasets/cifar10-jpeg.tar.gz}
epochs=${EPOCHS:-30}
cycles=${CYCLES:-3}
out=${OUT:-runs/cifar10-methods}
methods=("$@")
[ ${#methods[@]} -gt 0 ] || methods=(sd se bl)
[ -f "$tar_file" ] || { echo "no CIFAR-10 archive at $tar_file: set FASTSD_CIFAR_JPEG_TAR" >&2; exit 2; }

data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
tar -xzf "$tar_file" -C "$data"
runs=()
for seed in ${SEEDS:-0}; do
  for method in "${methods[@]}"; do
    run=$out/$method-resnet20-seed$seed
    runs+=("$run")
    if [ -f "$run/results.json" ]; then echo "$run: done already"; continue; fi
    common=(--data "$data" --progress plain --log-every 390)  # may change on --resume
    if [ -f "$run/checkpoints/last.pt" ]; then
      $python -m fastsd.train --resume "$run" "${common[@]}"
      continue
    fi
    shape=()
    case $method in se|sd) shape=(--cycles "$cycles") ;; esac
    # shellcheck disable=SC2086
    $python -m fastsd.train --dataset cifar10 --arch resnet20 --method "$method" \
      --epochs "$epochs" "${shape[@]}" --seed "$seed" --dali --out "$run" "${common[@]}" \
      ${ARGS:-}
  done
done
$python -m fastsd.report "${runs[@]}" --out "$out/report" --no-plots
