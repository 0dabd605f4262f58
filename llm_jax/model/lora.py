"""LoRA: low-rank adapters beside frozen base weights, as a parameter transform.

An adapter for a projection W [in..., out...] is A [in..., r] and B [r, out...], and the layer
computes x W + (alpha / r) dropout(x) A B. The adapters live in a tree shaped like the model's
parameters that holds only the adapted projections (`{"layers": {"self_attn": {"q_proj":
{"lora_a", "lora_b"}}}}`); `attach` returns the parameters the model runs on, each adapted
projection carrying its adapter next to its kernel, and the model's one matmul helper
(`transformer._dense`, and the output head) adds `delta`. Nothing else in the model knows LoRA.

B starts at zero, so a fresh adapter leaves the base model's outputs exactly as they were.
Adapters take the logical axes of their base weight on the side they share with it (A its
input axes, B its output axes), so they shard like it on any (data, fsdp, tensor) mesh.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from llm_jax.config import ConfigError, FinetuneConfig, ModelConfig

Params = dict[str, Any]

# target -> (path of the projection in the parameter tree, number of its kernel's input dimensions)
TARGETS = {
    "q": (("layers", "self_attn", "q_proj"), 1),
    "k": (("layers", "self_attn", "k_proj"), 1),
    "v": (("layers", "self_attn", "v_proj"), 1),
    "o": (("layers", "self_attn", "o_proj"), 2),
    "gate": (("layers", "mlp", "gate_proj"), 1),
    "up": (("layers", "mlp", "up_proj"), 1),
    "down": (("layers", "mlp", "down_proj"), 1),
    "head": (("lm_head",), 1),
}


def targets(cfg: FinetuneConfig, model: ModelConfig) -> list[str]:
  """The configured targets, checked against the architecture."""
  names = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
  for name in names:
    if name not in TARGETS:
      raise ConfigError(f"finetune.lora_targets has {name!r}; choose from {', '.join(TARGETS)}")
  if "gate" in names and model.mlp != "swiglu":
    raise ConfigError(f"finetune.lora_targets has 'gate', but this model's MLP is {model.mlp!r} (no gate "
                      "projection); drop it from the targets")
  if "head" in names and model.tie_embeddings:
    raise ConfigError("finetune.lora_targets has 'head', but this model ties its output head to the embedding "
                      "(model.tie_embeddings); drop it from the targets")
  if not names:
    raise ConfigError("finetune.lora_rank is set but finetune.lora_targets is empty; name some, e.g. q,v")
  return names


def _nodes(scanned: bool, num_layers: int, names: list[str]):
  """(target, node path) for every adapted projection; unscanned layers each get their own node."""
  for name in names:
    path, _ = TARGETS[name]
    if path[0] == "layers" and not scanned:
      for i in range(num_layers):
        yield name, ("layers", str(i), *path[1:])
    else:
      yield name, path


def _get(tree: Params, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: Params, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _split(kernel_shape: tuple, stacked: bool, n_in: int) -> tuple[tuple, tuple, tuple]:
  lead = kernel_shape[:1] if stacked else ()
  rest = kernel_shape[len(lead):]
  return lead, rest[:n_in], rest[n_in:]


def init(base: Params, model: ModelConfig, cfg: FinetuneConfig, rng: jax.Array) -> Params:
  """Fresh adapters for `base` (arrays or ShapeDtypeStructs): A ~ N(0, 1/in), B = 0."""
  names = targets(cfg, model)
  scanned = "input_layernorm" in base["layers"]
  adapters: Params = {}
  nodes = list(_nodes(scanned, model.num_layers, names))
  for (name, path), key in zip(nodes, jax.random.split(rng, len(nodes))):
    kernel = _get(base, path)["kernel"]
    lead, in_shape, out_shape = _split(kernel.shape, path[0] == "layers" and scanned, TARGETS[name][1])
    fan_in = math.prod(in_shape)
    a = jax.random.normal(key, (*lead, *in_shape, cfg.lora_rank), jnp.float32) / jnp.sqrt(fan_in)
    _set(adapters, path, {"lora_a": a, "lora_b": jnp.zeros((*lead, cfg.lora_rank, *out_shape), jnp.float32)})
  return adapters


def logical_axes(base_axes: Params, model: ModelConfig, cfg: FinetuneConfig, scanned: bool) -> Params:
  """The adapters' logical axes: A takes its kernel's input axes, B its output axes; the rank is unsharded."""
  axes: Params = {}
  for name, path in _nodes(scanned, model.num_layers, targets(cfg, model)):
    kernel_axes = tuple(_get(base_axes, path)["kernel"])
    lead, in_axes, out_axes = _split(kernel_axes, path[0] == "layers" and scanned, TARGETS[name][1])
    _set(axes, path, {"lora_a": (*lead, *in_axes, None), "lora_b": (*lead, None, *out_axes)})
  return axes


def _is_adapter(x: Any) -> bool:
  return isinstance(x, dict) and "lora_a" in x


def attach(base: Params, adapters: Params, cfg: FinetuneConfig, rng: jax.Array | None = None) -> Params:
  """The parameters the model runs on: the base with each adapted projection carrying its adapter.

  B is scaled by alpha / rank here, and with `rng` and finetune.lora_dropout each projection gets
  the key and rate of the dropout on its adapter's input (one per layer where layers are stacked,
  so the scan over layers hands each layer its own).
  """
  scale = cfg.lora_alpha / cfg.lora_rank
  found = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=_is_adapter)[0]
  keys = list(jax.random.split(rng, len(found))) if rng is not None and cfg.lora_dropout else [None] * len(found)
  out = jax.tree.map(lambda x: x, base)  # new containers; the arrays are shared
  for (key_path, adapter), key in zip(found, keys):
    path = tuple(k.key for k in key_path)
    node = {**_get(out, path), "lora_a": adapter["lora_a"], "lora_b": adapter["lora_b"] * scale}
    if key is not None:
      stacked = adapter["lora_a"].ndim + adapter["lora_b"].ndim - 2 > node["kernel"].ndim
      layers = adapter["lora_a"].shape[:1] if stacked else ()
      node["lora_dropout_key"] = jax.random.split(key, layers[0]) if stacked else key
      node["lora_dropout_rate"] = jnp.full(layers, cfg.lora_dropout, jnp.float32)
    _set(out, path, node)
  return out


def delta(x: jax.Array, p: Params, spec: str, dtype) -> jax.Array:
  """(alpha / r) dropout(x) A B, for the einsum `spec` of x and the kernel (e.g. "bld,dhk->blhk")."""
  inputs, out = spec.split("->")
  x_sub, w_sub = inputs.split(",")
  contracted = "".join(c for c in w_sub if c in x_sub)
  kept = "".join(c for c in x_sub if c not in contracted)
  if "lora_dropout_key" in p:
    keep = 1.0 - p["lora_dropout_rate"]
    x = jnp.where(jax.random.bernoulli(p["lora_dropout_key"], keep, x.shape), x / keep, 0).astype(x.dtype)
  h = jnp.einsum(f"{x_sub},{contracted}r->{kept}r", x, p["lora_a"].astype(dtype))
  return jnp.einsum(f"{kept}r,r{out[len(kept):]}->{out}", h, p["lora_b"].astype(dtype))


def merge(base: Params, adapters: Params, cfg: FinetuneConfig) -> Params:
  """The base with every adapted kernel replaced by W + (alpha / r) A B: plain parameters, no adapters."""
  def merged(node):
    if not _is_adapter(node):
      return node
    a, b, kernel = node["lora_a"], node["lora_b"], node["kernel"]
    lead = a.ndim + b.ndim - 2 - kernel.ndim  # 1 where layers are stacked: A [L, in..., r], B [L, r, out...]
    a_IR = a.reshape(*a.shape[:lead], -1, a.shape[-1])
    b_RO = b.reshape(*b.shape[:lead + 1], -1)
    product = jnp.einsum("...ir,...ro->...io", a_IR, b_RO).reshape(kernel.shape)
    rest = {k: v for k, v in node.items() if not k.startswith("lora_")}
    return {**rest, "kernel": (kernel.astype(jnp.float32) + product).astype(kernel.dtype)}

  return jax.tree.map(merged, attach(base, adapters, cfg), is_leaf=_is_adapter)
