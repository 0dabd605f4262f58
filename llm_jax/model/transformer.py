"""One decoder-only transformer for the GPT-2 and Llama families.

Flax NNX modules here are thin parameter containers: they create each parameter with its
initializer and its logical axis names, nothing more. The math lives in `forward`, a pure
function of a plain nested dict of arrays, so the trainer can jit it with explicit shardings
and the sampler can call it without any module state.

Parameter names follow Hugging Face's Llama layout (`embed_tokens`, `layers.self_attn.q_proj`,
`mlp.up_proj`, `input_layernorm`, `norm`, `lm_head`); GPT-2's tensors map onto the same names
(wte -> embed_tokens, wpe -> embed_positions, c_attn -> q/k/v_proj, c_fc -> up_proj, ...).

With `scan_layers` the blocks' parameters are stacked on a leading `layers` axis and the
forward pass is a `lax.scan`, so compile time does not grow with depth. Unscanned, `layers`
is a dict {"0": block, "1": block, ...}; `stack_layers`/`unstack_layers` convert.

With `num_classes` > 0 the tree also holds `classifier` ({"kernel": [D, C], "bias": [C]}),
the head that `heads.classify` applies to `hidden`; the LM head stays, so a classifier can start
from a pretrained language model's checkpoint (the trainer restores the rest into it).

Dimension letters as in layers.py (B, L, S, D, H, G, K, F, V; N = number of layers; C = classes).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from llm_jax.config import ModelConfig
from llm_jax.model import attention, layers, lora, quant
from llm_jax.sharding import constrain

Params = dict[str, Any]

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], std: float | None,
           dtype: jnp.dtype, stack: int) -> nnx.Param:
  """A parameter with its logical axes; `stack` > 0 adds a leading `layers` axis of that size.

  std None means ones (norm scales), 0 means zeros (biases), otherwise normal(0, std).
  """
  if stack:
    shape, axes = (stack, *shape), ("layers", *axes)
  if std is None:
    value = jnp.ones(shape, dtype)
  elif std == 0:
    value = jnp.zeros(shape, dtype)
  else:
    value = std * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, logical_axes=axes)


class Dense(nnx.Module):
  def __init__(self, in_shape, out_shape, in_axes, out_axes, *, bias: bool, std: float, dtype, stack: int,
               rngs: nnx.Rngs):
    self.kernel = _param(rngs, (*in_shape, *out_shape), (*in_axes, *out_axes), std, dtype, stack)
    if bias:
      self.bias = _param(rngs, out_shape, out_axes, 0, dtype, stack)


class Norm(nnx.Module):
  def __init__(self, cfg: ModelConfig, dtype, stack: int, rngs: nnx.Rngs):
    self.scale = _param(rngs, (cfg.d_model,), ("embed",), None, dtype, stack)
    if cfg.norm == "layernorm" and cfg.use_bias:
      self.bias = _param(rngs, (cfg.d_model,), ("embed",), 0, dtype, stack)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, dtype, stack: int, rngs: nnx.Rngs):
    d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
    qkv_bias = cfg.use_bias or cfg.qkv_bias
    std, out_std = cfg.init_std, _residual_std(cfg)
    self.q_proj = Dense((d,), (h, k), ("embed",), ("heads", "head_dim"), bias=qkv_bias, std=std, dtype=dtype, stack=stack, rngs=rngs)
    self.k_proj = Dense((d,), (g, k), ("embed",), ("kv_heads", "head_dim"), bias=qkv_bias, std=std, dtype=dtype, stack=stack, rngs=rngs)
    self.v_proj = Dense((d,), (g, k), ("embed",), ("kv_heads", "head_dim"), bias=qkv_bias, std=std, dtype=dtype, stack=stack, rngs=rngs)
    self.o_proj = Dense((h, k), (d,), ("heads", "head_dim"), ("embed",), bias=cfg.use_bias, std=out_std, dtype=dtype, stack=stack, rngs=rngs)


class Mlp(nnx.Module):
  def __init__(self, cfg: ModelConfig, dtype, stack: int, rngs: nnx.Rngs):
    d, f, bias = cfg.d_model, cfg.d_ff, cfg.use_bias
    if cfg.mlp == "swiglu":
      self.gate_proj = Dense((d,), (f,), ("embed",), ("mlp",), bias=bias, std=cfg.init_std, dtype=dtype, stack=stack, rngs=rngs)
    self.up_proj = Dense((d,), (f,), ("embed",), ("mlp",), bias=bias, std=cfg.init_std, dtype=dtype, stack=stack, rngs=rngs)
    self.down_proj = Dense((f,), (d,), ("mlp",), ("embed",), bias=bias, std=_residual_std(cfg), dtype=dtype, stack=stack, rngs=rngs)


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, dtype, stack: int, rngs: nnx.Rngs):
    self.input_layernorm = Norm(cfg, dtype, stack, rngs)
    self.self_attn = Attention(cfg, dtype, stack, rngs)
    self.post_attention_layernorm = Norm(cfg, dtype, stack, rngs)
    self.mlp = Mlp(cfg, dtype, stack, rngs)


class Transformer(nnx.Module):
  """The parameter tree of one model; `forward` computes with it."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.param_dtype)
    self.embed_tokens = nnx.Dict(embedding=_param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, dtype, 0))
    if cfg.position == "learned":
      self.embed_positions = nnx.Dict(embedding=_param(rngs, (cfg.max_len, cfg.d_model), (None, "embed"), cfg.init_std, dtype, 0))
    if cfg.scan_layers:
      self.layers = Block(cfg, dtype, cfg.num_layers, rngs)
    else:
      self.layers = nnx.Dict({str(i): Block(cfg, dtype, 0, rngs) for i in range(cfg.num_layers)})
    self.norm = Norm(cfg, dtype, 0, rngs)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Dict(kernel=_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, dtype, 0))
    if cfg.num_classes > 0:
      c = cfg.num_classes
      self.classifier = nnx.Dict(kernel=_param(rngs, (cfg.d_model, c), ("embed", None), cfg.init_std, dtype, 0),
                                 bias=_param(rngs, (c,), (None,), 0, dtype, 0))


def _residual_std(cfg: ModelConfig) -> float:
  """GPT-2 scales the init of projections into the residual stream by 1/sqrt(2 x layers)."""
  return cfg.init_std / math.sqrt(2 * cfg.num_layers) if cfg.scaled_residual_init else cfg.init_std


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
  """Freshly initialized parameters as a plain nested dict (jit it with out_shardings)."""
  state = nnx.state(Transformer(cfg, nnx.Rngs(params=rng)), nnx.Param)
  return nnx.to_pure_dict(state)


def logical_axes(cfg: ModelConfig) -> Params:
  """The logical axis names of every parameter, in the same tree as `init_params`; no allocation."""
  state = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param)
  return nnx.to_pure_dict(jax.tree.map(lambda v: v.get_metadata()["logical_axes"], state, is_leaf=_is_variable))


def abstract_params(cfg: ModelConfig) -> Params:
  """Shapes and dtypes of every parameter (jax.ShapeDtypeStruct leaves); no allocation."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def stack_layers(params: Params) -> Params:
  """Unscanned layout -> scanned layout (layers stacked on a leading axis)."""
  blocks = params["layers"]
  ordered = [blocks[str(i)] for i in range(len(blocks))]
  return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *ordered)}


def unstack_layers(params: Params) -> Params:
  """Scanned layout -> unscanned layout ({"0": block, "1": block, ...})."""
  stacked = params["layers"]
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  return {**params, "layers": {str(i): jax.tree.map(lambda x: x[i], stacked) for i in range(num_layers)}}


def is_scanned(params: Params) -> bool:
  return "input_layernorm" in params["layers"]


def _dense(x: jax.Array, p: Params, spec: str, dtype) -> jax.Array:
  """x times a projection's kernel (+ bias); the one place a weight multiplies, where a LoRA adapter adds in
  and an int8 kernel (model/quant.py) is scaled."""
  y = quant.einsum(spec, x, p, "kernel", dtype)
  if "lora_a" in p:
    y = y + lora.delta(x, p, spec, dtype)
  return y + layers.lead(p["bias"].astype(dtype), y) if "bias" in p else y


def _norm(x_BLD: jax.Array, p: Params, cfg: ModelConfig) -> jax.Array:
  if cfg.norm == "rmsnorm":
    return layers.rms_norm(x_BLD, p["scale"], cfg.norm_eps)
  return layers.layer_norm(x_BLD, p["scale"], p.get("bias"), cfg.norm_eps)


def _split_rng(rng: jax.Array | None, n: int) -> list[jax.Array | None]:
  return [None] * n if rng is None else list(jax.random.split(rng, n))


def block(x_BLD: jax.Array, p: Params, cfg: ModelConfig, mask_BLS: jax.Array, positions_BL: jax.Array,
          rng: jax.Array | None = None, kv_cache: Callable | None = None) -> jax.Array:
  """One pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

  `kv_cache`, when given, maps this call's (k_BLGK, v_BLGK) to the keys and values to attend
  to (the sampler uses it to write into and read from its cache); `mask_BLS` must match them.
  """
  dtype = jnp.dtype(cfg.dtype)
  attn_rng, drop1, drop2 = _split_rng(rng, 3)
  h_BLD = _norm(x_BLD, p["input_layernorm"], cfg).astype(dtype)
  attn = p["self_attn"]
  q_BLHK = _dense(h_BLD, attn["q_proj"], "bld,dhk->blhk", dtype)
  k_BLGK = _dense(h_BLD, attn["k_proj"], "bld,dgk->blgk", dtype)
  v_BLGK = _dense(h_BLD, attn["v_proj"], "bld,dgk->blgk", dtype)
  if cfg.position == "rope":
    inv_freq = layers.rope_inv_freq(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling, cfg.rope_scaling_factor,
                                    cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len)
    q_BLHK = layers.apply_rope(q_BLHK, positions_BL, inv_freq)
    k_BLGK = layers.apply_rope(k_BLGK, positions_BL, inv_freq)
  k_BSGK, v_BSGK = kv_cache(k_BLGK, v_BLGK) if kv_cache else (k_BLGK, v_BLGK)
  implementation = attention_implementation(cfg, q_BLHK.shape[1], dense_mask=not isinstance(mask_BLS, layers.Segments))
  out_BLHK = layers.attention(q_BLHK, k_BSGK, v_BSGK, mask_BLS, implementation=implementation,
                              causal_blocks=1 if kv_cache else _causal_blocks(q_BLHK.shape[1]),
                              dropout_rate=cfg.attn_dropout, rng=attn_rng, sliding_window=cfg.sliding_window)
  attn_BLD = _dense(out_BLHK, attn["o_proj"], "blhk,hkd->bld", dtype)
  x_BLD = x_BLD + layers.dropout(attn_BLD, cfg.resid_dropout, drop1).astype(x_BLD.dtype)

  h_BLD = _norm(x_BLD, p["post_attention_layernorm"], cfg).astype(dtype)
  m = p["mlp"]
  up_BLF = _dense(h_BLD, m["up_proj"], "bld,df->blf", dtype)
  gate_BLF = _dense(h_BLD, m["gate_proj"], "bld,df->blf", dtype) if cfg.mlp == "swiglu" else None
  mlp_BLD = _dense(layers.mlp_activation(up_BLF, gate_BLF, cfg.mlp), m["down_proj"], "blf,fd->bld", dtype)
  x_BLD = x_BLD + layers.dropout(mlp_BLD, cfg.resid_dropout, drop2).astype(x_BLD.dtype)
  return constrain(x_BLD, ("batch", "length", None))


def attention_implementation(cfg: ModelConfig, seq_len: int = 0, dense_mask: bool = False) -> str:
  """The kernel `model.attention` runs on this machine (`attention.resolve`); a fallback of auto is said once.

  `dense_mask`: attention under a KV cache, which only the masked paths take.
  """
  implementation, note = attention.resolve(
      cfg.attention, attention.current_target(), dtype=cfg.dtype, head_dim=cfg.dim_per_head,
      seq_len=seq_len or cfg.max_len, attn_dropout=cfg.attn_dropout, dense_mask=dense_mask)
  attention.say_once(note)
  return implementation


def _causal_blocks(length: int) -> int:
  """Query blocks of 128 for causal self-attention (fastest measured on CPU at length 256)."""
  return length // 128 if length >= 256 and length % 128 == 0 else 1


def embed(params: Params, cfg: ModelConfig, tokens_BL: jax.Array, positions_BL: jax.Array,
          rng: jax.Array | None = None) -> jax.Array:
  dtype = jnp.dtype(cfg.dtype)
  # Gather from replicated tables: a gather from a (vocab, embed)-sharded one makes XLA
  # rematerialize the whole table anyway, and with a warning ("Involuntary full rematerialization").
  table = params["embed_tokens"]
  table = {**table, "embedding": constrain(table["embedding"], (None, None))}
  x_BLD = quant.take(table, "embedding", tokens_BL, dtype)
  if cfg.position == "learned":
    x_BLD = x_BLD + constrain(params["embed_positions"]["embedding"], (None, None)).astype(dtype)[positions_BL]
  x_BLD = layers.dropout(x_BLD, cfg.embed_dropout, rng)
  return constrain(x_BLD, ("batch", "length", None))


def final_norm(params: Params, cfg: ModelConfig, x_BLD: jax.Array) -> jax.Array:
  return _norm(x_BLD, params["norm"], cfg).astype(jnp.dtype(cfg.dtype))


def unembed(params: Params, cfg: ModelConfig, x_BLD: jax.Array) -> jax.Array:
  """Final norm and output head; logits in float32."""
  return lm_head(params, cfg, final_norm(params, cfg, x_BLD))


def lm_head(params: Params, cfg: ModelConfig, h_BLD: jax.Array) -> jax.Array:
  """The output head on final-normed hidden states; logits in float32."""
  if cfg.tie_embeddings:
    logits_BLV = quant.einsum("bld,vd->blv", h_BLD, params["embed_tokens"], "embedding", h_BLD.dtype,
                              preferred_element_type=jnp.float32)
  else:
    logits_BLV = quant.einsum("bld,dv->blv", h_BLD, params["lm_head"], "kernel", h_BLD.dtype,
                              preferred_element_type=jnp.float32)
    if "lora_a" in params["lm_head"]:
      logits_BLV = logits_BLV + lora.delta(h_BLD, params["lm_head"], "bld,dv->blv", h_BLD.dtype).astype(jnp.float32)
  return constrain(logits_BLV, ("batch", "length", "vocab"))


def _for_each_layer(params: Params, cfg: ModelConfig, one: Callable, x_BLD: jax.Array, carry: Any,
                    rng: jax.Array | None) -> tuple[jax.Array, Any]:
  """Calls `one(x, layer_params, layer_index, rng, carry) -> (x, carry)` for every block.

  Scanned layouts run a `lax.scan` (the index is then traced); unscanned ones a Python loop.
  `carry` rides through whole, not sliced per layer, so a KV cache in it is updated in place.
  """
  rngs = None if rng is None else jax.random.split(rng, cfg.num_layers)
  if is_scanned(params):
    def step(state, inputs):
      (x, c), (p, i, r) = state, inputs
      return one(x, p, i, r, c), None
    (x_BLD, carry), _ = jax.lax.scan(step, (x_BLD, carry), (params["layers"], jnp.arange(cfg.num_layers), rngs))
    return x_BLD, carry
  for i in range(cfg.num_layers):
    x_BLD, carry = one(x_BLD, params["layers"][str(i)], i, None if rngs is None else rngs[i], carry)
  return x_BLD, carry


def apply_layers(params: Params, cfg: ModelConfig, x_BLD: jax.Array, mask_BLS: jax.Array,
                 positions_BL: jax.Array, rng: jax.Array | None = None) -> jax.Array:
  """Runs every block, scanned or unrolled as the parameter layout says, with remat as configured."""
  def one(x, p, r):
    return block(x, p, cfg, mask_BLS, positions_BL, r)

  if cfg.remat != "none":
    one = jax.checkpoint(one, policy=_REMAT_POLICIES[cfg.remat])
  x_BLD, _ = _for_each_layer(params, cfg, lambda x, p, i, r, c: (one(x, p, r), c), x_BLD, None, rng)
  return x_BLD


def apply_layers_cached(params: Params, cfg: ModelConfig, x_BLD: jax.Array, mask_BLS: jax.Array,
                        positions_BL: jax.Array, cache: Any, update_cache: Callable) -> tuple[jax.Array, Any]:
  """`apply_layers` for inference with a KV cache: returns (x_BLD, updated cache).

  `update_cache(cache, layer_index, k_BLGK, v_BLGK) -> (cache, k_BSGK, v_BSGK)` writes this
  call's keys and values into the sampler's cache (whose layout this module does not know) and
  returns what block `layer_index` attends to; `mask_BLS` must match those S keys. No dropout
  and no remat: there are no gradients to save memory for.
  """
  def one(x, p, i, r, cache):
    written = []  # the block calls kv_cache exactly once, during this trace

    def kv_cache(k_BLGK, v_BLGK):
      new_cache, k_BSGK, v_BSGK = update_cache(cache, i, k_BLGK, v_BLGK)
      written.append(new_cache)
      return k_BSGK, v_BSGK

    x = block(x, p, cfg, mask_BLS, positions_BL, kv_cache=kv_cache)
    return x, written[0]

  return _for_each_layer(params, cfg, one, x_BLD, cache, None)


def forward(params: Params, cfg: ModelConfig, tokens_BL: jax.Array, *, segment_ids_BL: jax.Array | None = None,
            positions_BL: jax.Array | None = None, rng: jax.Array | None = None) -> jax.Array:
  """Logits [B, L, V] in float32 for token ids [B, L].

  Packed rows pass `segment_ids_BL` (documents never attend to each other; 0 is padding) and
  `positions_BL` (restarting at 0 in each document). Dropout applies only when `rng` is given.
  """
  return lm_head(params, cfg, hidden(params, cfg, tokens_BL, segment_ids_BL=segment_ids_BL, positions_BL=positions_BL,
                                     rng=rng))


def hidden(params: Params, cfg: ModelConfig, tokens_BL: jax.Array, *, segment_ids_BL: jax.Array | None = None,
           positions_BL: jax.Array | None = None, rng: jax.Array | None = None) -> jax.Array:
  """`forward` without the output head: the final-normed hidden states [B, L, D] (in model.dtype) that
  a head (the LM head, `heads.classify`) reads. Arguments as for `forward`."""
  if segment_ids_BL is None:
    segment_ids_BL = jnp.ones_like(tokens_BL)
  if positions_BL is None:
    positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
  if attention_implementation(cfg, tokens_BL.shape[1]) in attention.FUSED:  # they take the documents, not a mask
    mask_BLS = layers.Segments(segment_ids_BL, positions_BL)
  else:
    mask_BLS = layers.attention_mask(segment_ids_BL, segment_ids_BL, positions_BL, positions_BL, cfg.sliding_window)
  embed_rng, layers_rng = _split_rng(rng, 2)
  x_BLD = embed(params, cfg, tokens_BL, positions_BL, embed_rng)
  x_BLD = apply_layers(params, cfg, x_BLD, mask_BLS, positions_BL, layers_rng)
  return final_norm(params, cfg, x_BLD)
