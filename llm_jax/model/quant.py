"""Weight-only int8 for inference, as a parameter transform beside an unchanged model.

A quantized weight W [in..., out...] is stored as int8 Q = round(W / s), clipped to [-127, 127],
with one float32 scale per output channel, s = max |W over the inputs| / 127 (symmetric: no zero
point, so 0 stays exactly 0). The scale sits next to the weight as `kernel_scale` (or
`embedding_scale`), and the model's places that multiply by a weight (`einsum` here, called by
`transformer._dense` and the output head; `take` for the embedding lookup) compute x Q in the
compute dtype and multiply the product by s afterwards: sum_i x_i Q_ij s_j = s_j sum_i x_i Q_ij,
so the scale costs one multiply per output instead of a dequantized copy of the weight.

`quantize` converts every attention and MLP projection; with `embeddings` also the token
embedding (one scale per vocabulary row, which serves both the lookup and a tied output head)
and an untied `lm_head`. Norms, biases and learned positions stay float: they are a small share
of the bytes and the most sensitive to rounding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from llm_jax.model import layers

Params = dict[str, Any]

# projection -> how many leading axes of its kernel are inputs (o_proj: [H, K] -> D)
PROJECTIONS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1, "down_proj": 1}
MODES = ("none", "int8")
_SCALE = "_scale"


def _quantized(node: Params, name: str, in_axes: tuple[int, ...]) -> Params:
  """`node` with `node[name]` as int8 and its per-output-channel scale beside it."""
  w = node[name].astype(jnp.float32)
  amax = jnp.max(jnp.abs(w), axis=in_axes, keepdims=True)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)  # an all-zero channel: any scale gives back zeros
  q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
  return {**node, name: q, name + _SCALE: jnp.squeeze(scale, in_axes)}


def _quantize_projections(tree: Params, lead: int) -> Params:
  """Every projection under `tree` (one block, or the stack of all blocks with `lead` = 1 axis in front)."""
  out = {}
  for key, node in tree.items():
    if key in PROJECTIONS:
      node = _quantized(node, "kernel", tuple(range(lead, lead + PROJECTIONS[key])))
    elif isinstance(node, dict):
      node = _quantize_projections(node, lead)
    out[key] = node
  return out


def quantize(params: Params, embeddings: bool = False) -> Params:
  """The int8 parameters of a float model (arrays or, under `jax.eval_shape`, shapes)."""
  scanned = "input_layernorm" in params["layers"]
  layers = (_quantize_projections(params["layers"], 1) if scanned else
            {i: _quantize_projections(block, 0) for i, block in params["layers"].items()})
  params = {**params, "layers": layers}
  if embeddings:
    params["embed_tokens"] = _quantized(params["embed_tokens"], "embedding", (1,))  # [V, D]: a scale per row
    if "lm_head" in params:
      params["lm_head"] = _quantized(params["lm_head"], "kernel", (0,))  # [D, V]
  return params


def cast(params: Params, dtype: str) -> Params:
  """Every float parameter in `dtype`, except the int8 weights and their float32 scales."""
  def one(path, x):
    if x.dtype == jnp.int8 or str(path[-1].key).endswith(_SCALE):
      return x
    return x.astype(jnp.dtype(dtype))
  return jax.tree_util.tree_map_with_path(one, params)


def is_quantized(p: Params, name: str) -> bool:
  return name + _SCALE in p


def einsum(spec: str, x: jax.Array, p: Params, name: str, dtype: Any, preferred_element_type: Any = None) -> jax.Array:
  """x times the weight `p[name]` by the einsum `spec` (e.g. "bld,dhk->blhk"), in `dtype`.

  An int8 weight enters the product as integers in `dtype` (exact up to 127 in bfloat16 too),
  and its scale multiplies the result's output channels, the weight's axes that x lacks.
  """
  y = layers.weight_einsum(spec, x, p[name].astype(dtype), preferred_element_type)
  if not is_quantized(p, name):
    return y
  inputs, out = spec.split("->")
  x_sub, w_sub = inputs.split(",")
  channels = "".join(c for c in w_sub if c not in x_sub)
  return jnp.einsum(f"{out},{channels}->{out}", y, p[name + _SCALE].astype(y.dtype))


def take(p: Params, name: str, ids: jax.Array, dtype: Any) -> jax.Array:
  """Rows `ids` of the table `p[name]` [V, D] in `dtype` (an embedding lookup): [..., D]."""
  rows = p[name][ids].astype(dtype)
  if not is_quantized(p, name):
    return rows
  return rows * p[name + _SCALE][ids][..., None].astype(dtype)
