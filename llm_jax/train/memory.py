"""Per-device memory of a training step, planned from shapes alone (what `llm-jax inspect` prints).

For one device of the config's mesh, at its batch, sequence length, dtypes and remat policy:

  parameters   every parameter's shard, in model.param_dtype
  optimizer    the optax state's shards (its real tree: AdamW's two moments, Adafactor's factors, ...)
  gradients    one more parameter-sized set of shards (the step holds them beside the old parameters)
  activations  what the forward pass keeps for the backward pass: per layer, what the remat policy
               saves, plus the float32 logits of the output head and their gradient (of
               `train.loss_chunk` positions of each row, where set); and the one
               layer whose backward is running, with every intermediate its remat recomputed
  gathered     the weights of one layer gathered out of their FSDP shards (in model.dtype), and
               the replicated copies of the embedding tables that the lookups read

The estimate is checked against the compiled step's own `memory_analysis()` on CPU
(tests/test_memory.py); on accelerators, XLA's fusion choices move the activations by some
percent either way. A device "fits" when the total is under 90% of its memory, leaving room for
XLA's workspace and fragmentation.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from llm_jax import config as config_lib
from llm_jax import sharding
from llm_jax.model import transformer
from llm_jax.train import optim
from llm_jax.train import state as state_lib

GIB = 2**30
# Memory per chip (vendor figures, in GiB); the SXM parts for NVIDIA.
DEVICE_MEMORY_GIB = {"H100": 80, "H200": 141, "A100": 80, "TPU v4": 32, "TPU v5e": 16, "TPU v5p": 95, "TPU v6e": 32}
HEADROOM = 0.9


def _shard_bytes(tree: Any, shardings: Any) -> int:
  total = 0
  for leaf, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    total += math.prod(spec.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  return total


def saved_per_token(model: config_lib.ModelConfig, seq_len: int, tensor: int, fused_attention: bool,
                    remat: str = "") -> int:
  """Elements one layer keeps for the backward pass per token, under the model's remat policy.

  full: the layer's input only. save_matmuls: the input and every weight matmul's output
  (q, k, v, the attention output's projection, the MLP's up, gate and down). none: everything,
  including attention's [heads, keys] arrays per query unless a fused kernel keeps only its
  log-sum-exp. Head, kv-head and MLP widths are split over the tensor axis. The counts of
  elementwise intermediates follow what XLA keeps on CPU (checked against `memory_analysis()`).
  """
  d, f = model.d_model, model.d_ff // tensor
  q, kv = model.num_heads * model.dim_per_head // tensor, model.num_kv_heads * model.dim_per_head // tensor
  up = f * (2 if model.mlp == "swiglu" else 1)
  matmuls = d + q + 2 * kv + d + up + d
  policy = remat or model.remat
  if policy == "full":
    return d
  if policy == "save_matmuls":
    return matmuls
  heads = model.num_heads // tensor
  # unfused attention keeps its logits, their exponentials and the weights, [heads, keys] each per query
  attention = heads if fused_attention else 3 * heads * seq_len
  activation = (2 if model.mlp == "swiglu" else 3) * f  # silu: sigmoid and product; tanh GELU: cube, tanh, product
  rope = q + kv if model.position == "rope" else 0
  return matmuls + 2 * d + rope + q + attention + activation + 2 * d  # + norms, attention output, residuals


def plan(config: config_lib.Config) -> dict[str, Any]:
  """Bytes per device of the step's state and working set, with the fit on each device kind.

  Attention counts as fused (cuDNN, splash: no [queries, keys] weights kept) where an accelerator
  would run it so: model.attention auto, cudnn or splash in a 16-bit dtype.
  """
  model = config.model
  fused_attention = model.attention in ("auto", "cudnn", "splash") and model.dtype != "float32"
  mesh = sharding.plan_mesh(config.mesh)
  data, fsdp, tensor = (mesh.shape[a] for a in sharding.MESH_AXES)
  optimizer = optim.make_optimizer(config.optim, config.train.steps)
  abstract = jax.eval_shape(lambda: state_lib.init(model, optimizer, 0, config.finetune))
  shardings = state_lib.shardings(model, optimizer, mesh, config.finetune)
  params = _shard_bytes(abstract.params, shardings.params) + _shard_bytes(abstract.frozen, shardings.frozen)
  trained = _shard_bytes(abstract.params, shardings.params)
  opt_state = _shard_bytes(abstract.opt_state, shardings.opt_state)

  compute = np.dtype(model.dtype).itemsize
  rows = config.train.batch_size // config.train.microbatches // (data * fsdp)
  seq_len = min(config.data.seq_len, model.max_len)
  tokens = rows * seq_len
  logits = 2 * model.vocab_size // tensor * 4  # float32 logits and their gradient, per position
  logit_positions = min(config.train.loss_chunk or seq_len, seq_len)  # at once (train.loss_chunk, train/losses.py)
  saved = saved_per_token(model, seq_len, tensor, fused_attention)
  running = saved_per_token(model, seq_len, tensor, fused_attention, "none") - saved  # recomputed in its backward
  activations = tokens * (model.num_layers * saved + running) * compute + rows * logit_positions * logits
  gathered = 0
  if fsdp > 1:  # one layer's weights gathered out of their FSDP shards, in the compute dtype
    layer_params = sum(math.prod(x.shape) for x in jax.tree.leaves(transformer.abstract_params(model)["layers"]))
    gathered = layer_params // model.num_layers // tensor * compute
  if fsdp > 1 or tensor > 1:  # the lookups read replicated copies of the embedding tables
    gathered += model.vocab_size * model.d_model * compute
  if fsdp > 1 and model.position == "learned":  # (positions are sharded over fsdp only)
    gathered += model.max_len * model.d_model * compute
  total = params + opt_state + trained + activations + gathered
  return {
      "mesh": dict(mesh.shape), "rows_per_device": rows, "seq_len": seq_len, "dtype": model.dtype,
      "remat": model.remat, "parameters": params, "optimizer_state": opt_state, "gradients": trained,
      "activations": activations, "gathered_weights": gathered, "total": total,
      "fits": {name: fit_line(total, name) for name in DEVICE_MEMORY_GIB},
  }


def fit_line(total: int, device: str) -> str:
  gib = DEVICE_MEMORY_GIB[device]
  verdict = "fits" if total <= HEADROOM * gib * GIB else "does not fit"
  return f"{verdict} on {device} ({gib} GiB): {total / GIB:.2f} GiB per device"


def compiled_memory(config: config_lib.Config, devices: list | None = None) -> Any:
  """XLA's `memory_analysis()` of the compiled train step for `devices` (default: all), from shapes alone."""
  from llm_jax.train import step as step_lib
  mesh = sharding.make_mesh(config.mesh, devices)
  optimizer = optim.make_optimizer(config.optim, config.train.steps)
  schedule = optim.schedule(config.optim, config.train.steps)
  shardings = state_lib.shardings(config.model, optimizer, mesh, config.finetune)
  train_step, _ = step_lib.compile_steps(config, optimizer, schedule, mesh, shardings)
  rows = jax.ShapeDtypeStruct((config.train.batch_size, config.data.seq_len), np.int32,
                              sharding=sharding.batch_sharding(mesh))
  batch = {k: rows for k in ("inputs", "targets", "segment_ids", "positions")}
  batch["loss_mask"] = jax.ShapeDtypeStruct(rows.shape, np.float32, sharding=rows.sharding)
  state = state_lib.abstract(config.model, optimizer, mesh, config.finetune)
  with jax.set_mesh(mesh):
    return train_step.jitted.lower(state, batch).compile().memory_analysis()


def compiled_bytes(config: config_lib.Config) -> int:
  """Bytes per device that XLA's compiled train step takes, from shapes alone.

  Arguments (state and batch) + outputs - the donated state they share + temporaries: what the
  plan estimates. Compiles for the devices of this process, so the mesh must fit them.
  """
  stats = compiled_memory(config)
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
          + stats.temp_size_in_bytes)


REMAT_ORDER = ("none", "save_matmuls", "full")  # least recomputation first


def best_remat(config: config_lib.Config, device_bytes: int) -> str:
  """The remat policy that recomputes least while the planned step fits in HEADROOM of `device_bytes`."""
  for policy in REMAT_ORDER:
    if plan(config_lib.override(config, {"model.remat": policy}))["total"] <= HEADROOM * device_bytes:
      return policy
  return REMAT_ORDER[-1]
