#!/usr/bin/env bash
# The GPU check of issue 4, for a session that is lent an accelerator (the device tool runs it
# in the repository root). That machine has jax with CUDA, flax, optax and orbax but not grain
# or TFDS, and llm-jax is not installed there: bench_train.py imports nothing from the data
# pipeline, and PYTHONPATH makes the package importable. Prints one JSON line per run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import jax; print(jax.__version__, jax.devices())"
python scripts/bench_train.py --preset gpt2-124m --dtype bfloat16 --batch-size 32 --seq-len 1024 --steps 20
python scripts/bench_train.py --preset gpt2-124m --dtype bfloat16 --batch-size 32 --seq-len 1024 --steps 20 \
    model.remat=none
