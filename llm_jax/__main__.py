"""`python -m llm_jax` is the `llm-jax` command."""

from llm_jax.cli import run

if __name__ == "__main__":
  run()
