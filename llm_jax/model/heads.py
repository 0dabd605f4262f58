"""Task heads on the transformer's hidden states: sequence classification.

A classifier reads the hidden state at each example's LAST real token: attention is causal, so
only that position has seen the whole example (the data pipeline ends every example with eos
and puts its label there). Rows may be padded and packed with several examples; the last token
of an example is where its segment id changes, or the row ends, and segment 0 (padding) has none.

Dimension letters as in transformer.py (C = classes).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.model import layers

Params = dict[str, Any]


def last_tokens(segment_ids_BL: jax.Array) -> jax.Array:
  """bool [B, L]: True at the last token of every example (segment > 0) of a packed, padded row."""
  ends_BL = jnp.concatenate([segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1],
                             jnp.ones_like(segment_ids_BL[:, :1], bool)], axis=1)
  return ends_BL & (segment_ids_BL > 0)


def classify(params: Params, model: ModelConfig, hidden_BLD: jax.Array) -> jax.Array:
  """Class logits [B, L, C] in float32 at every position; a loss or a caller picks the last tokens."""
  head = params["classifier"]
  logits_BLC = jnp.einsum("bld,dc->blc", hidden_BLD, head["kernel"].astype(hidden_BLD.dtype),
                          preferred_element_type=jnp.float32)
  return logits_BLC + layers.lead(head["bias"].astype(jnp.float32), logits_BLC)
