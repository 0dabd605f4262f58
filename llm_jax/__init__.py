"""llm-jax: train, sample and evaluate GPT-2 and Llama-family language models in JAX.

The public Python API is small: `llm_jax.load(path)` returns a model handle with `.config`,
`.tokenizer`, `.logits(token_ids)` and `.generate(prompts, ...)`.
"""

__version__ = "0.1.0"


def load(path: str, **kwargs):
  """Loads a workdir or checkpoint for inference: see `llm_jax.handle.load`."""
  from llm_jax import handle
  return handle.load(path, **kwargs)
