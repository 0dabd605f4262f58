#!/usr/bin/env bash
# The GPU check of issue 16, prepared for one run on an H200 machine of the device tool, under
# 10 minutes: `bash scripts/device_check.sh` in the repository root. Prints JSON lines:
#   1. the attention kernel (cuDNN) against XLA's float32 attention on packed, GQA, windowed rows;
#   2. gpt2-124m and llama-1b, seq 2048, bf16, cuDNN attention, the remat policy that recomputes
#      least while inspect's plan fits the device (--remat best), 30 timed steps each: tokens/s,
#      MFU against the H200's bf16 peak (989 TFLOP/s dense), peak device memory against the
#      planned bytes, compile time.
# That machine's image has jax (CUDA), flax, optax and numpy, which is all bench_train.py and
# llm_jax's model and step import (no grain, TFDS or orbax); llm-jax itself is not installed
# there, PYTHONPATH makes it importable. A package the image lacks is installed from wheels
# carried in .whl/ (the device tool's README says how to fetch them); nothing else is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
for module in jax flax optax numpy; do
  if ! "$PYTHON" -c "import $module" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
      "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
      export PYTHONPATH="$PYTHONPATH:/tmp/site"
      break
    fi
    echo "device_check: python module $module is missing and no wheels are carried in .whl/" >&2
    exit 1
  fi
done
"$PYTHON" -c "import jax, json; print(json.dumps({'jax': jax.__version__, 'devices': [str(d) for d in jax.devices()]}))"
"$PYTHON" scripts/attention_check.py --implementation cudnn || echo '{"attention_check": "failed"}'
for run in "gpt2-124m 16" "llama-1b 16"; do
  set -- $run
  timeout 240 "$PYTHON" scripts/bench_train.py --preset "$1" --batch-size "$2" --seq-len 2048 --dtype bfloat16 \
      --steps 30 --remat best model.attention=cudnn mesh.fsdp=1 \
    || echo "{\"preset\": \"$1\", \"failed\": true}"
done
