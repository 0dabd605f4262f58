"""`python -m llm_jax` is the `llm-jax` command."""

import sys

from llm_jax.cli import main

if __name__ == "__main__":
  sys.exit(main())
