"""The train state pytree, built sharded from shapes alone.

`create` follows the abstract-first pattern: `jax.eval_shape` gives every leaf's shape, the
logical axis rules give its sharding, and a jitted init writes each shard straight onto its
device, so no host or device ever holds an unsharded copy of a large model.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from llm_jax import sharding
from llm_jax.config import FinetuneConfig, ModelConfig
from llm_jax.model import lora, transformer


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any  # what trains: the model's parameters (transformer.init_params layout), or LoRA adapters
  opt_state: optax.OptState  # of `params` only
  rng: jax.Array  # uint32[2] key for dropout; advanced every step
  guard: dict[str, jax.Array]  # the update guard's counters and loss mean (step.guard_update); checkpointed
  frozen: Any = {}  # what does not train: the LoRA base's parameters ({} otherwise); never checkpointed


def init_guard() -> dict[str, jax.Array]:
  return {"skipped": jnp.zeros((), jnp.int32), "consecutive": jnp.zeros((), jnp.int32),
          "accepted": jnp.zeros((), jnp.int32), "loss_mean": jnp.zeros((), jnp.float32)}


def init(model: ModelConfig, optimizer: optax.GradientTransformation, seed: int,
         finetune: FinetuneConfig | None = None) -> TrainState:
  """A fresh state; pure, so it can run under `jax.eval_shape` and `jax.jit`.

  With LoRA (`finetune.lora_rank`), the model's parameters are frozen and fresh adapters train.
  """
  init_rng, rng, lora_rng = jax.random.split(jax.random.PRNGKey(seed), 3)
  params, frozen = transformer.init_params(model, init_rng), {}
  if finetune is not None and finetune.lora_rank:
    params, frozen = lora.init(params, model, finetune, lora_rng), params
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), rng, init_guard(), frozen)


def shardings(model: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
              finetune: FinetuneConfig | None = None) -> TrainState:
  """NamedSharding of every state leaf: optimizer moments shard like their parameters, adapters like their base."""
  abstract = jax.eval_shape(lambda: init(model, optimizer, 0, finetune))
  model_axes = transformer.logical_axes(model)
  replicated = sharding.replicated(mesh)
  if abstract.frozen:
    frozen_shardings = sharding.param_shardings(mesh, model_axes, abstract.frozen)
    adapter_axes = lora.logical_axes(model_axes, model, finetune, model.scan_layers)
    param_shardings = sharding.param_shardings(mesh, adapter_axes, abstract.params)
  else:
    frozen_shardings, param_shardings = {}, sharding.param_shardings(mesh, model_axes, abstract.params)

  def like_param(leaf, param_sharding: NamedSharding, param):
    # Factored statistics (Adafactor) have other shapes than their parameter: replicate those.
    return param_sharding if leaf.shape == param.shape else replicated

  opt_shardings = optax.tree_map_params(
      optimizer, like_param, abstract.opt_state, param_shardings, abstract.params,
      transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  return TrainState(replicated, param_shardings, opt_shardings, replicated,
                    jax.tree.map(lambda _: replicated, abstract.guard), frozen_shardings)


def abstract(model: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
             finetune: FinetuneConfig | None = None) -> TrainState:
  """ShapeDtypeStructs carrying their shardings: the target for a sharded restore."""
  shapes = jax.eval_shape(lambda: init(model, optimizer, 0, finetune))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      shardings(model, optimizer, mesh, finetune))


def create(model: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh, seed: int,
           finetune: FinetuneConfig | None = None) -> TrainState:
  """A fresh state whose every leaf is born in its sharding."""
  out = shardings(model, optimizer, mesh, finetune)
  return jax.jit(lambda: init(model, optimizer, seed, finetune), out_shardings=out)()
