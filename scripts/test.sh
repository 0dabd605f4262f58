#!/usr/bin/env bash
# The test command: set up .venv with the dev, hf, data, serve and eval extras, then run the whole suite.
#   bash scripts/test.sh [pytest args]
# First, in a second environment (.venv-tf) with the tf extra, the one test that needs
# TensorFlow (tfrecord datasets that TensorFlow writes); the main environment has no TensorFlow on purpose,
# because the offline TFDS path must be shown to work without it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${LLM_JAX_SKIP_TF_STAGE:-}" ]; then
  [ -x .venv-tf/bin/python ] || python3 -m venv .venv-tf
  .venv-tf/bin/python -m pip install -q --upgrade pip
  .venv-tf/bin/python -m pip install -q -e ".[dev,tf]"
  LLM_JAX_EXPECT_TF=1 .venv-tf/bin/python -m pytest -q -p no:cacheprovider tests/test_tfrecord.py
fi
EXTRAS=dev,hf,data,serve,eval source scripts/setup_env.sh
# Two pytest workers (worksteal: an idle one takes tests from the busy one): most tests wait on a
# subprocess, a compile or a second process, so two workers keep both cores of a CI machine busy.
python -m pytest -q -n 2 --dist worksteal --durations=25 "$@"
