"""The losses the one train step takes: where the loss is computed.

A loss is `loss_fn(params, batch, rng) -> (objective, sums)`. Both are SUMS over the batch, not
means: `objective` is what is differentiated (the loss plus any auxiliary term), and `sums`
holds at least `loss` (the summed loss alone) and `count` (how many tokens or examples it sums
over), plus whatever else a task counts (`correct`). The step adds them over microbatches and
divides by the global count once, so accumulation and sharding change nothing, and one
compiled step serves pretraining, SFT and classification, which differ only in loss and data.

`rng` is a key for dropout; a loss passes it to the model only when the model has dropout.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from llm_jax.config import Config, ModelConfig
from llm_jax.eval import loss as eval_loss
from llm_jax.model import transformer

Batch = dict[str, jax.Array]
LossFn = Callable[[Any, Batch, jax.Array | None], tuple[jax.Array, dict[str, jax.Array]]]


def has_dropout(model: ModelConfig) -> bool:
  return max(model.embed_dropout, model.attn_dropout, model.resid_dropout) > 0


def lm_loss(params: Any, batch: Batch, rng: jax.Array | None, *, model: ModelConfig,
            z_loss: float = 0.0, chunk: int = 0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Next-token cross-entropy in float32 over tokens with `loss_mask` 1 (pretraining and SFT), + z-loss.

  With `chunk` (a divisor of the length), the output head and the loss run over `chunk` positions
  of every row at a time, and the backward pass recomputes each chunk's logits: the [B, L, V]
  logits and their gradient never exist whole, which is most of a step's memory where the
  vocabulary is large. It costs one more forward pass of the head. The sums are the same up to
  float32 rounding.
  """
  hidden_BLD = transformer.hidden(params, model, batch["inputs"], segment_ids_BL=batch["segment_ids"],
                                  positions_BL=batch["positions"], rng=rng if has_dropout(model) else None)
  mask_BL = batch["loss_mask"].astype(jnp.float32)
  sums = functools.partial(_head_sums, params, model)
  length = hidden_BLD.shape[1]
  if not chunk or chunk >= length:
    ce, log_z_sq = sums(hidden_BLD, batch["targets"], mask_BL)
  else:
    def one(totals, start):  # a slice along the length keeps the batch's sharding, and copies nothing
      sliced = [jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1) for x in (hidden_BLD, batch["targets"], mask_BL)]
      return jax.tree.map(jnp.add, totals, jax.checkpoint(sums)(*sliced)), None

    zero = jnp.zeros((), jnp.float32)
    (ce, log_z_sq), _ = jax.lax.scan(one, (zero, zero), jnp.arange(0, length, chunk))
  objective = ce + z_loss * log_z_sq if z_loss else ce
  return objective, {"loss": ce, "count": mask_BL.sum()}


def _head_sums(params: Any, model: ModelConfig, hidden_BLD: jax.Array, targets_BL: jax.Array,
               mask_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(summed cross-entropy, summed log(Z)^2) of the masked positions, through the output head."""
  logits_BLV = transformer.lm_head(params, model, hidden_BLD)
  log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  return ((log_z_BL - target_logit_BL) * mask_BL).sum(), (jnp.square(log_z_BL) * mask_BL).sum()


def classification_loss(params: Any, batch: Batch, rng: jax.Array | None, *,
                        model: ModelConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy of the class logits at each example's last token, summed; `correct` counts argmax hits.
  The eval floor's own sums (`eval/loss.py`), differentiated: dev loss and train loss are one computation."""
  sums = eval_loss.classification_sums(params, batch, rng if has_dropout(model) else None, model=model)
  return sums["loss"], sums


def for_config(config: Config) -> LossFn:
  """The loss a run's config asks for: classification for data.format=classification, else next-token."""
  if config.data.format == "classification":
    return functools.partial(classification_loss, model=config.model)
  return functools.partial(lm_loss, model=config.model, z_loss=config.train.z_loss, chunk=config.train.loss_chunk)
