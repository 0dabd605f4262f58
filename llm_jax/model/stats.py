"""Parameter counts, FLOPs per token and memory of a model, from shapes alone (no allocation).

FLOP convention (also used for MFU): a training token costs
  6 x (non-embedding parameters + lm head parameters) + 12 x layers x seq_len x d_model
FLOPs: 2 for the forward and 4 for the backward multiply-add of every weight the token
passes through (the output head counts even when tied to the input embedding, because its
matmul runs either way; embedding lookups are free), plus causal attention's QK^T and AV
matmuls counted over the full L x L square, as PaLM's appendix B counts them.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from llm_jax import config as config_lib
from llm_jax.model import transformer


def count_params(model: config_lib.ModelConfig) -> dict[str, int]:
  abstract = transformer.abstract_params(model)
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
  embedding = sum(int(np.prod(abstract[k]["embedding"].shape)) for k in ("embed_tokens", "embed_positions") if k in abstract)
  return {"params": total, "non_embedding_params": total - embedding}


def flops_per_token(model: config_lib.ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward) under the convention in this module's docstring."""
  counts = count_params(model)
  head = 0 if not model.tie_embeddings else model.d_model * model.vocab_size  # untied head is already non-embedding
  return 6.0 * (counts["non_embedding_params"] + head) + 12.0 * model.num_layers * seq_len * model.d_model


def summarize(config: config_lib.Config) -> dict[str, Any]:
  """What `llm-jax inspect` prints: sizes, FLOPs per token and every parameter's sharding."""
  from llm_jax import sharding
  model = config.model
  config_lib.validate_model(model)
  counts = count_params(model)
  itemsize = np.dtype(model.param_dtype).itemsize
  seq_len = min(config.data.seq_len, model.max_len)
  mesh = sharding.plan_mesh(config.mesh)
  abstract = transformer.abstract_params(model)
  specs = sharding.param_shardings(mesh, transformer.logical_axes(model), abstract)
  return {
      **counts,
      "flops_per_token": flops_per_token(model, seq_len),
      "flops_convention": "6*(non_embedding_params + lm_head) + 12*layers*seq_len*d_model, training (fwd+bwd)",
      "seq_len": seq_len,
      "param_bytes": counts["params"] * itemsize,
      # AdamW keeps two float32 moments per parameter.
      "train_state_bytes_adamw": counts["params"] * (itemsize + 8),
      "mesh": dict(mesh.shape),
      "shardings": sharding.describe(specs, abstract),
  }
