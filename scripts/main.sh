#!/usr/bin/env bash
# The main job: install, pretrain the small GPT on Tiny Shakespeare (TFDS), print a sample.
#   bash scripts/main.sh                                   # online: TFDS downloads the data
#   bash scripts/main.sh --from-file PATH/input.txt        # offline: build the TFDS dataset from a local copy
set -euo pipefail
EXTRAS= source "$(dirname "$0")/setup_env.sh"
if [ "${1:-}" = "--from-file" ]; then
  llm-jax data prepare tiny_shakespeare --from-file "$2" --data-dir "${TFDS_DATA_DIR:-$HOME/tensorflow_datasets}"
  shift 2
fi
llm-jax train --config configs/tiny_shakespeare.py --workdir "${WORKDIR:-runs/shakespeare}" "$@"
