"""The trainer's evaluation, on the scoring engine: summed losses of packed batches, then their figures.

The trainer's jitted eval step runs `sums_for(config)` on each batch of its validation (or
test) split; `summarize` adds the sums over batches and divides once, so the figures do not
depend on how the examples were split into batches or over devices. The next-token sums are
the engine's log-probabilities (`scoring.token_log_probs`), so `eval_loss` and `llm-jax eval`
read one model through one computation. The classification sums are also the training loss
of a classifier (`train/losses.py` differentiates them), so dev loss and train loss agree.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import Config, ModelConfig
from llm_jax.eval import scoring
from llm_jax.model import heads, transformer

Batch = dict[str, jax.Array]  # every array [B, L]: inputs, targets, segment_ids, positions, loss_mask (+ labels)
Sums = dict[str, jax.Array]  # loss (summed), count, and correct for classification


def lm_sums(params: Any, batch: Batch, *, model: ModelConfig) -> Sums:
  """Summed next-token cross-entropy (float32) over the targets with `loss_mask` 1, and their count."""
  log_p_BL, _ = scoring.token_log_probs(params, model, batch["inputs"], batch["targets"],
                                        segment_ids_BL=batch["segment_ids"], positions_BL=batch["positions"])
  mask_BL = batch["loss_mask"].astype(jnp.float32)
  return {"loss": -(log_p_BL * mask_BL).sum(), "count": mask_BL.sum()}


def classification_sums(params: Any, batch: Batch, rng: jax.Array | None = None, *, model: ModelConfig) -> Sums:
  """Cross-entropy (float32) of the class logits at every position with a label (`labels` >= 0: each example's
  last token, see model/heads.py), summed over examples; `correct` counts argmax hits. `rng` is for dropout
  (training); evaluation passes none."""
  hidden_BLD = transformer.hidden(params, model, batch["inputs"], segment_ids_BL=batch["segment_ids"],
                                  positions_BL=batch["positions"], rng=rng)
  logits_BLC = heads.classify(params, model, hidden_BLD)
  labels_BL = batch["labels"]
  valid_BL = (labels_BL >= 0).astype(jnp.float32)
  target_logit_BL = jnp.take_along_axis(logits_BLC, jnp.maximum(labels_BL, 0)[..., None], axis=-1)[..., 0]
  ce = ((jax.nn.logsumexp(logits_BLC, axis=-1) - target_logit_BL) * valid_BL).sum()
  correct = ((jnp.argmax(logits_BLC, axis=-1) == labels_BL).astype(jnp.float32) * valid_BL).sum()
  return {"loss": ce, "count": valid_BL.sum(), "correct": correct}


def sums_for(config: Config) -> Callable[[Any, Batch], Sums]:
  """What one eval batch sums to: classification for data.format=classification, else next-token."""
  if config.data.format == "classification":
    return lambda params, batch: classification_sums(params, batch, model=config.model)
  return lambda params, batch: lm_sums(params, batch, model=config.model)


def summarize(eval_step: Callable[..., Sums], params: Any, frozen: Any, batches: Iterable[tuple[int, Batch]],
              prefix: str) -> dict[str, float]:
  """`{prefix}_loss` and `{prefix}_perplexity`, or with classification `{prefix}_accuracy` (and for the test
  split `{prefix}_examples`), over every batch of `batches`; results are fetched once, at the end."""
  totals = None
  for _, batch in batches:
    sums = eval_step(params, frozen, batch)
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  totals = jax.device_get(totals)
  count = max(float(totals["count"]), 1.0)
  loss = float(totals["loss"] / count)
  if "correct" not in totals:
    return {f"{prefix}_loss": loss, f"{prefix}_perplexity": math.exp(min(loss, 50.0))}
  out = {f"{prefix}_loss": loss, f"{prefix}_accuracy": float(totals["correct"]) / count}
  return {**out, f"{prefix}_examples": int(totals["count"])} if prefix == "test" else out
