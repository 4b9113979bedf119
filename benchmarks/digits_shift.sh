#!/usr/bin/env bash
# USPS <-> MNIST (recipe=image_digits_shift) in both directions: protocol (b) keeps 10 labels per class of the
# source, protocol (a) every source label. One quality grid per direction and protocol, into RUNS/DIRECTION-PROTOCOL.
# Resumable: finished runs are reused.
#   bash benchmarks/digits_shift.sh PATH/digits-usps-mnist.tar.gz RUNS "SEEDS" "CELLS" [more key=value ...]
#   DIRECTIONS="mnist-usps" PROTOCOLS="b a" bash benchmarks/digits_shift.sh \
#       ../shared/data/digits-shift/digits-usps-mnist.tar.gz runs/digits "0 1 2" "supervised sscl dmssl:mmd"
# CELL_EXTRA="CELL KEY=VALUE ..." gives overrides to some cells only (quality.py --cell-extra), e.g.
#   CELL_EXTRA="dmssl:* objective.lambda_dm=1" for every dmssl cell (sscl and FixMatch have no lambda_dm).
set -euo pipefail
data=$1 runs=$2 seeds=$3 cells=$4
shift 4
read -ra cell_extra <<< "${CELL_EXTRA:-}"
[ ${#cell_extra[@]} -gt 0 ] && cell_extra=(--cell-extra "${cell_extra[@]}")
for direction in ${DIRECTIONS:-usps-mnist mnist-usps}; do
  source=${direction%-*} target=${direction#*-}
  for protocol in ${PROTOCOLS:-b a}; do
    extra=("data.labeled_groups=[$source]" "data.target_groups=[$target]")
    [ "$protocol" = a ] && extra+=("data.labels_per_class=null")
    folder="$runs/$direction-$protocol"
    mkdir -p "$folder"
    # shellcheck disable=SC2086
    python benchmarks/quality.py digits_shift --data "$data" --steps "${STEPS:-200}" --seeds $seeds --cells $cells \
        --runs "$folder" --jobs "${JOBS:-1}" --extra "${extra[@]}" "$@" "${cell_extra[@]}" > "$folder/quality.log" 2>&1
    echo "$direction ($protocol) done"
  done
done
