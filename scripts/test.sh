#!/usr/bin/env bash
# The test command: set up .venv with the dev and hf extras, then run the whole suite.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
EXTRAS=dev,hf source "$(dirname "$0")/setup_env.sh"
python -m pytest -q "$@"
