#!/usr/bin/env bash
# FSDD across speakers, leave one speaker out (recipe=audio_fsdd_pretrained, or PRESET=fsdd from scratch): for each
# of the 6 speakers, the labels come from the 5 others and the unlabeled pool, the dev split and the
# (transductive) test from that speaker alone. The linear probe on the runs' cached features, then a quality
# grid per target speaker, into RUNS/others-<speaker>. Resumable: finished runs are reused.
#   bash benchmarks/fsdd_speakers.sh PATH/fsdd-recordings.tar.gz RUNS "SEEDS" "CELLS" [more key=value ...]
#   bash benchmarks/fsdd_speakers.sh ../shared/data/fsdd/fsdd-recordings.tar.gz runs/fsdd-loso "0 1 2" \
#       "supervised fixmatch sscl dmssl:mmd" modality.pretrained=PATH/whisper-tiny.en data.cache_dir=runs/cache
set -euo pipefail
data=$1 runs=$2 seeds=$3 cells=$4
shift 4
preset=${PRESET:-fsdd_pretrained}
recipe=$([ "$preset" = fsdd ] && echo audio_fsdd || echo audio_fsdd_pretrained)
speakers=(${SPEAKERS:-jackson nicolas theo yweweler george lucas})
all=(jackson nicolas theo yweweler george lucas)
for target in "${speakers[@]}"; do
  others=$(printf '%s\n' "${all[@]}" | grep -vx "$target" | paste -sd, -)
  folder="$runs/others-$target"
  mkdir -p "$folder"
  extra=("data.root=$data" 'modality.group_pattern=^\d_([a-z]+)_' "data.labeled_groups=[$others]"
         "data.target_groups=[$target]" data.transductive_test=true "data.dev_size=${DEV_SIZE:-50}" "$@")
  if [ "$preset" != fsdd ] && [ ! -f "$folder/probe.json" ]; then
    # shellcheck disable=SC2086
    python benchmarks/linear_probe.py recipe=$recipe "${extra[@]}" --feature-cache --seeds $seeds \
        --json "$folder/probe.json" > "$folder/probe.log" 2>&1
  fi
  # shellcheck disable=SC2086
  python benchmarks/quality.py "$preset" --data "$data" --steps "${STEPS:-1000}" --seeds $seeds --cells $cells \
      --runs "$folder" --jobs "${JOBS:-1}" --extra "${extra[@]}" > "$folder/quality.log" 2>&1
  echo "others -> $target done"
done
