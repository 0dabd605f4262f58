#!/usr/bin/env bash
# The main job: install, pretrain the small GPT on Tiny Shakespeare (TFDS), print a sample.
#   bash scripts/main.sh                                   # online: TFDS downloads the data
#   bash scripts/main.sh --from-file PATH/input.txt        # offline: build the TFDS dataset from a local copy
# Each stage's wall time is printed at the end; the training's own is the one the README's target is about.
set -euo pipefail
seconds() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f s", b - a }'; }
t0=$(seconds)
EXTRAS= source "$(dirname "$0")/setup_env.sh"
t1=$(seconds)
report="install $(elapsed "$t0" "$t1")"
if [ "${1:-}" = "--from-file" ]; then
  llm-jax data prepare tiny_shakespeare --from-file "$2" --data-dir "${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}"
  shift 2
  t2=$(seconds)
  report="$report, data preparation $(elapsed "$t1" "$t2")"
  t1=$t2
fi
llm-jax train --config configs/tiny_shakespeare.py --workdir "${WORKDIR:-runs/shakespeare}" "$@"
t2=$(seconds)
echo "main.sh: $report, llm-jax train $(elapsed "$t1" "$t2") (on $(lscpu | sed -n 's/^Model name: *//p'))"
