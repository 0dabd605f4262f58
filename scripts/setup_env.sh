# Sourced by main.sh and test.sh: creates .venv (once) and installs llm-jax with EXTRAS into it.
# torch comes first as the CPU build pinned below: a bare `torch` requirement would pull a
# multi-GB CUDA build on a CPU-only machine. Set LLM_JAX_TORCH="" to skip that pin.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [ -n "${LLM_JAX_TORCH-torch==2.13.0}" ] && [[ "${EXTRAS:-}" == *hf* ]]; then
  python -m pip install -q "${LLM_JAX_TORCH-torch==2.13.0}"
fi
if [ -n "${EXTRAS:-}" ]; then python -m pip install -q -e ".[${EXTRAS}]"; else python -m pip install -q -e .; fi
