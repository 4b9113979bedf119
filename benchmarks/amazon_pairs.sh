#!/usr/bin/env bash
# The 12 source -> target pairs of Amazon multi-domain sentiment (recipe=text_amazon_shift): the linear probe on
# the runs' cached features, then a quality grid per pair. Resumable: finished runs are reused.
#   bash benchmarks/amazon_pairs.sh PATH/amazon-multidomain.jsonl.gz RUNS "SEEDS" "CELLS" [more key=value ...]
#   bash benchmarks/amazon_pairs.sh ../shared/data/amazon/amazon-multidomain.jsonl.gz runs/amazon "0 1 2" \
#       "supervised fixmatch sscl dmssl:mmd dmssl:coral dmssl:adversarial" data.cache_dir=runs/cache
set -euo pipefail
data=$1 runs=$2 seeds=$3 cells=$4
shift 4
domains=(books dvd electronics kitchen)
for source in "${domains[@]}"; do
  for target in "${domains[@]}"; do
    [ "$source" = "$target" ] && continue
    pair="$runs/$source-$target"
    mkdir -p "$pair"
    extra=("modality.train_files=[$data]" "data.labeled_groups=[$source]" "data.target_groups=[$target]" "$@")
    [ -f "$pair/probe.json" ] || python benchmarks/linear_probe.py recipe=text_amazon_shift "${extra[@]}" \
        --feature-cache --seeds $seeds --pool 500 --json "$pair/probe.json" > "$pair/probe.log" 2>&1
    # shellcheck disable=SC2086
    python benchmarks/quality.py amazon_shift --steps "${STEPS:-250}" --seeds $seeds --cells $cells --runs "$pair" \
        --jobs "${JOBS:-2}" --extra "${extra[@]}" trainer.eval_every="${STEPS:-250}" trainer.checkpoint_every="${STEPS:-250}" > "$pair/quality.log" 2>&1
    echo "$source -> $target done"
  done
done
