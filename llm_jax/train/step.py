"""The one train step and its eval twin: loss, gradients, accumulation, optax update, metrics.

`train_step(state, batch) -> (state, metrics)` is pure; `compile_steps` jits it once with
explicit shardings and the state donated. Pretraining and fine-tuning share it: a batch
carries a `loss_mask` (all ones on real tokens for pretraining, the answer tokens for SFT).

The loss is computed here: token cross-entropy in float32, summed over unmasked tokens and
divided by their count in the whole global batch, plus an optional z-loss.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from llm_jax import sharding
from llm_jax.config import Config
from llm_jax.model import transformer
from llm_jax.train.state import TrainState

Batch = dict[str, jax.Array]  # inputs, targets, segment_ids, positions: int32 [B, L]; loss_mask: float32 [B, L]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def loss_sums(params: Any, config: Config, batch: Batch, rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Summed (not averaged) masked cross-entropy + z-loss, so microbatches add up exactly."""
  logits_BLV = transformer.forward(params, config.model, batch["inputs"], segment_ids_BL=batch["segment_ids"],
                                   positions_BL=batch["positions"], rng=rng)
  log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_logit_BL = jnp.take_along_axis(logits_BLV, batch["targets"][..., None], axis=-1)[..., 0]
  mask_BL = batch["loss_mask"].astype(jnp.float32)
  ce = ((log_z_BL - target_logit_BL) * mask_BL).sum()
  z = (jnp.square(log_z_BL) * mask_BL).sum()
  total = ce + config.train.z_loss * z if config.train.z_loss else ce
  return total, {"ce_sum": ce, "tokens": mask_BL.sum()}


def _microbatches(batch: Batch, n: int) -> Batch:
  """[B, L] -> [n, B/n, L], microbatch j holding rows j, j+n, j+2n, ...

  Splitting rows this way keeps each device's rows on that device: the batch axis stays
  sharded over (data, fsdp) and no data moves between devices.
  """
  return {k: jnp.swapaxes(v.reshape(v.shape[0] // n, n, *v.shape[1:]), 0, 1) for k, v in batch.items()}


def train_step(state: TrainState, batch: Batch, *, config: Config, optimizer: optax.GradientTransformation,
               lr_schedule: optax.Schedule) -> tuple[TrainState, dict[str, jax.Array]]:
  rng, step_rng = jax.random.split(state.rng)
  use_dropout = max(config.model.embed_dropout, config.model.attn_dropout, config.model.resid_dropout) > 0
  grad_fn = jax.grad(loss_sums, has_aux=True)
  n = config.train.microbatches

  if n == 1:
    grads, aux = grad_fn(state.params, config, batch, step_rng if use_dropout else None)
  else:
    def accumulate(carry, xs):
      micro, micro_rng = xs
      g, a = grad_fn(state.params, config, micro, micro_rng if use_dropout else None)
      return jax.tree.map(jnp.add, carry, (g, a)), None
    zeros = (jax.tree.map(jnp.zeros_like, state.params), {"ce_sum": jnp.zeros(()), "tokens": jnp.zeros(())})
    (grads, aux), _ = jax.lax.scan(accumulate, zeros, (_microbatches(batch, n), jax.random.split(step_rng, n)))

  tokens = jnp.maximum(aux["tokens"], 1.0)
  grads = jax.tree.map(lambda g: g / tokens, grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      "loss": aux["ce_sum"] / tokens,
      "grad_norm": optax.tree.norm(grads),
      "learning_rate": lr_schedule(state.step),
      "tokens": aux["tokens"],
  }
  return TrainState(state.step + 1, params, opt_state, rng), metrics


def eval_step(params: Any, batch: Batch, *, config: Config) -> dict[str, jax.Array]:
  """Summed loss and token count of one batch; the caller divides after summing batches."""
  _, aux = loss_sums(params, config, batch)
  return aux


def compile_steps(config: Config, optimizer: optax.GradientTransformation, lr_schedule: optax.Schedule,
                  mesh: Mesh, state_shardings: TrainState) -> tuple[Callable, Callable]:
  """(train_step, eval_step) jitted with explicit shardings; the train state is donated.

  Both run under the mesh so activation constraints in the model apply.
  """
  batch_shardings = {k: sharding.batch_sharding(mesh) for k in BATCH_KEYS}
  replicated = sharding.replicated(mesh)
  train = jax.jit(
      functools.partial(train_step, config=config, optimizer=optimizer, lr_schedule=lr_schedule),
      in_shardings=(state_shardings, batch_shardings), out_shardings=(state_shardings, replicated),
      donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, config=config),
                     in_shardings=(state_shardings.params, batch_shardings), out_shardings=replicated)

  def with_mesh(fn):
    @functools.wraps(fn)
    def run(*args):
      with jax.set_mesh(mesh):
        return fn(*args)
    run.jitted = fn
    return run

  return with_mesh(train), with_mesh(evaluate)
