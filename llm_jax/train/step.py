"""The one train step and its eval twin: gradients of the given loss, accumulation, optax update, guard, metrics.

`train_step(state, batch) -> (state, metrics)` is pure; `compile_steps` jits it once with
explicit shardings and the state donated. The loss comes in as a function (`train/losses.py`,
where it is computed): pretraining, SFT and classification share this step and differ only in
the loss and the data. The step divides the loss's summed gradients by its count over the
whole global batch, so microbatches and shards add up exactly, then guards the update.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from llm_jax import sharding
from llm_jax.config import Config, FinetuneConfig, TrainConfig
from llm_jax.eval import loss as eval_loss
from llm_jax.model import lora
from llm_jax.train import losses
from llm_jax.train.state import TrainState

SPIKE_WINDOW = 50  # accepted steps the spike guard's running mean spans (and waits for before judging)
Batch = dict[str, jax.Array]  # every array [B, L]: inputs, targets, segment_ids, positions, loss_mask (+ a task's own)


def _microbatches(batch: Batch, n: int) -> Batch:
  """[B, L] -> [n, B/n, L], microbatch j holding rows j, j+n, j+2n, ...

  Splitting rows this way keeps each device's rows on that device: the batch axis stays
  sharded over (data, fsdp) and no data moves between devices.
  """
  return {k: jnp.swapaxes(v.reshape(v.shape[0] // n, n, *v.shape[1:]), 0, 1) for k, v in batch.items()}


ToModel = Callable[[Any, Any, jax.Array | None], Any]  # (frozen, trained, rng) -> the parameters the model runs on


def to_model(finetune: FinetuneConfig) -> ToModel:
  """How the trained parameters become the model's: themselves, or LoRA adapters attached to the frozen base."""
  if not finetune.lora_rank:
    return lambda frozen, params, rng: params
  return lambda frozen, params, rng: lora.attach(frozen, params, finetune, None if rng is None else
                                                 jax.random.fold_in(rng, 1))


def train_step(state: TrainState, batch: Batch, *, loss_fn: losses.LossFn, model_params: ToModel, train: TrainConfig,
               optimizer: optax.GradientTransformation, lr_schedule: optax.Schedule, axis_name: str | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the summed gradients of `loss_fn`, divided by the global batch's count.

  Only `state.params` are differentiated and updated; `state.frozen` (a LoRA base) goes in as is.
  Under `jax.pmap` (`axis_name` given) `batch` is this device's rows: the gradient and loss sums
  are summed over devices before the division, so every device takes the same step, the one the
  jitted step takes on the whole batch (a mean of per-device means would weigh each device's
  tokens unequally wherever the loss masks differ).
  """
  rng, step_rng = jax.random.split(state.rng)
  if axis_name is not None:  # each device its own dropout masks
    step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
  grad_fn = jax.grad(lambda p, b, r: loss_fn(model_params(state.frozen, p, r), b, r), has_aux=True)
  n = train.microbatches

  if n == 1:
    grads, sums = grad_fn(state.params, batch, step_rng)
  else:
    def accumulate(carry, xs):
      micro, micro_rng = xs
      return jax.tree.map(jnp.add, carry, grad_fn(state.params, micro, micro_rng)), None
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state.params, batch, step_rng))
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, (_microbatches(batch, n), jax.random.split(step_rng, n)))
  if axis_name is not None:
    grads, sums = jax.lax.psum((grads, sums), axis_name)

  count = jnp.maximum(sums["count"], 1.0)
  grads = jax.tree.map(lambda g: g / count, grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  loss, grad_norm, param_norm = sums["loss"] / count, optax.tree.norm(grads), optax.tree.norm(params)
  accept, guard = guard_update(state.guard, loss, jnp.isfinite(grad_norm) & jnp.isfinite(param_norm),
                               train.spike_factor)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(accept, n, o), new, old)  # noqa: E731
  metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "param_norm": param_norm,
      "learning_rate": lr_schedule(state.step),
      "tokens": sums["count"],
      "skipped_steps": guard["skipped"],
      "consecutive_skips": guard["consecutive"],
  }
  return TrainState(state.step + 1, keep(params, state.params), keep(opt_state, state.opt_state), rng, guard,
                    state.frozen), metrics


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


def eval_step(params: Any, frozen: Any, batch: Batch, *, sums_fn: Callable[[Any, Batch], dict[str, jax.Array]],
              model_params: ToModel) -> dict[str, jax.Array]:
  """The eval floor's sums over one batch (`eval/loss.py`, no dropout); the caller divides after summing batches."""
  return sums_fn(model_params(frozen, params, None), batch)


def compile_steps(config: Config, optimizer: optax.GradientTransformation, lr_schedule: optax.Schedule,
                  mesh: Mesh, state_shardings: TrainState, loss_fn: losses.LossFn | None = None
                  ) -> tuple[Callable, Callable]:
  """(train_step, eval_step) jitted with explicit shardings; the train state is donated.

  `loss_fn` defaults to the one the config asks for (`losses.for_config`); the eval step sums what
  `eval/loss.sums_for` says. Both run under the mesh so activation constraints in the model apply.
  With `mesh.mode=pmap` the same train step runs under `jax.pmap` instead (`pmapped`); the caller
  sees no difference.
  """
  loss_fn = loss_fn or losses.for_config(config)
  model_params = to_model(config.finetune)
  batch_shardings = sharding.batch_sharding(mesh)  # one sharding for every array of the batch, whatever its keys
  replicated = sharding.replicated(mesh)
  step = functools.partial(train_step, loss_fn=loss_fn, model_params=model_params, train=config.train,
                           optimizer=optimizer, lr_schedule=lr_schedule)
  train = jax.jit(step, in_shardings=(state_shardings, batch_shardings), out_shardings=(state_shardings, replicated),
                  donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, sums_fn=eval_loss.sums_for(config), model_params=model_params),
                     in_shardings=(state_shardings.params, state_shardings.frozen, batch_shardings),
                     out_shardings=replicated)

  def with_mesh(fn):
    @functools.wraps(fn)
    def run(*args):
      with jax.set_mesh(mesh):
        return fn(*args)
    run.jitted = fn
    return run

  if config.mesh.mode == "pmap":  # pmap has a mesh of its own, over the same devices
    return pmapped(step, mesh), with_mesh(evaluate)
  return with_mesh(train), with_mesh(evaluate)


PMAP_AXIS = "batch"


def pmapped(step: Callable, mesh: Mesh) -> Callable:
  """`step` under `jax.pmap` over the mesh's devices: pure data parallelism, for code that expects pmap.

  The state goes in and comes out whole (`in_axes`/`out_axes` None: replicated on every device,
  as the jitted step's state is on a data-only mesh), so checkpoints, evaluation and sampling
  see the same arrays in either mode. Each global batch [B, ...] is cut into [devices, B /
  devices, ...] in the mesh's device order, which keeps every row on the device that holds it.
  """
  devices = list(mesh.devices.flat)
  n = len(devices)
  parallel = jax.pmap(functools.partial(step, axis_name=PMAP_AXIS), axis_name=PMAP_AXIS, in_axes=(None, 0),
                      out_axes=(None, None), devices=devices, donate_argnums=0)
  split = jax.jit(lambda batch: jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch),
                  out_shardings=sharding.batch_sharding(mesh))

  def run(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    return parallel(state, split(batch))

  return run
