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

SPIKE_WINDOW = 50  # accepted steps the spike guard's running mean spans (and waits for before judging)
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
  loss, grad_norm, param_norm = aux["ce_sum"] / tokens, optax.tree.norm(grads), optax.tree.norm(params)
  accept, guard = guard_update(state.guard, loss, jnp.isfinite(grad_norm) & jnp.isfinite(param_norm),
                               config.train.spike_factor)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(accept, n, o), new, old)  # noqa: E731
  metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "param_norm": param_norm,
      "learning_rate": lr_schedule(state.step),
      "tokens": aux["tokens"],
      "skipped_steps": guard["skipped"],
      "consecutive_skips": guard["consecutive"],
  }
  return TrainState(state.step + 1, keep(params, state.params), keep(opt_state, state.opt_state), rng, guard), metrics


def guard_update(guard: dict[str, jax.Array], loss: jax.Array, finite: jax.Array,
                 spike_factor: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Whether to apply this step's update, and the guard's new counters; decided on device.

  An update is skipped when the loss, the gradient or the updated parameters are not finite, so
  a NaN never reaches the parameters (or a checkpoint), and, with `spike_factor`, when the loss
  exceeds that factor times its running mean over accepted steps (a plain mean for the first
  SPIKE_WINDOW of them, then an exponential one with that horizon; spikes are judged only after
  SPIKE_WINDOW). The host reads the counters from metrics it already fetches: no extra sync.
  """
  finite = finite & jnp.isfinite(loss)
  warm = guard["accepted"] >= SPIKE_WINDOW
  spike = warm & (loss > spike_factor * guard["loss_mean"]) if spike_factor else jnp.zeros((), bool)
  accept = finite & ~spike
  rate = 1.0 / jnp.minimum(guard["accepted"] + 1, SPIKE_WINDOW).astype(jnp.float32)
  return accept, {
      "skipped": guard["skipped"] + (~accept).astype(jnp.int32),
      "consecutive": jnp.where(accept, 0, guard["consecutive"] + 1),
      "accepted": guard["accepted"] + accept.astype(jnp.int32),
      "loss_mean": jnp.where(accept, guard["loss_mean"] + rate * (loss - guard["loss_mean"]), guard["loss_mean"]),
  }


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
