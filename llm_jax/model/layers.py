"""The transformer's math as pure array functions: arrays in, arrays out, no parameters held.

Dimension letters (tensor names end with their shape):
  B batch, L length (queries), S length (keys/values), D model width, H query heads,
  G key/value heads, K head dim, F mlp width, V vocab.

Numerics: norms, softmax and logits run in float32 whatever the compute dtype, because bf16
accumulation there costs accuracy for no speed.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from llm_jax.model import attention as kernels


def lead(v: jax.Array, x: jax.Array) -> jax.Array:
  """Adds leading unit axes so `v` broadcasts against `x` (tests forbid implicit rank promotion)."""
  return v.reshape((1,) * (x.ndim - v.ndim) + v.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def weight_einsum(spec: str, x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
  """`jnp.einsum(spec, x, w)` for an activation x and a weight w, with the backward written out.

  The backward computes autodiff's gradients (the same contractions in the same dtypes) in a form
  that XLA's CPU matmuls take without large transposed copies: see `_weight_gradient`. On a 2-core
  AVX2 machine gpt-10m's train step took about 0.85x of autodiff's time and the main job's about
  0.9x, each within a wide spread (docs/benchmarks.md). Accelerators run the same contractions.
  """
  return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type)


def _weight_einsum_fwd(spec, x, w, preferred_element_type):
  return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type), (x, w)


def _weight_einsum_bwd(spec, preferred_element_type, residuals, g):
  x, w = residuals
  inputs, out = spec.split("->")
  x_sub, w_sub = inputs.split(",")
  dx = jnp.einsum(f"{out},{w_sub}->{x_sub}", g, w, preferred_element_type=preferred_element_type)
  dw = _weight_gradient(x, x_sub, g, out, w_sub, preferred_element_type)
  return dx.astype(x.dtype), dw.astype(w.dtype)


def _weight_gradient(x: jax.Array, x_sub: str, g: jax.Array, g_sub: str, w_sub: str, preferred_element_type):
  """dw: x times the output gradient g, summed over the token axes, with the narrower operand first.

  XLA's CPU matmul kernel wants the first operand's summed axis innermost; activations have it
  outermost ([tokens, features]), so XLA writes a transposed copy of whichever operand it puts
  first, a strided write fused into the pass that made it. Autodiff's form let XLA pick the wide
  one (gpt-10m: the MLP's 1536 features, or the output head's 8192 logits, where 384 would do).
  Here the narrower of x and g goes first, and the barrier keeps XLA from folding the last
  transpose, into w's axis order, back into the product, which would swap the operands again.
  """
  x_free = "".join(c for c in x_sub if c in w_sub)
  g_free = "".join(c for c in g_sub if c in w_sub)

  def width(a: jax.Array, sub: str, free: str) -> int:
    return math.prod(a.shape[sub.index(c)] for c in free)

  (a, a_sub, a_free), (b, b_sub, b_free) = sorted(
      [(x, x_sub, x_free), (g, g_sub, g_free)], key=lambda operand: width(*operand))
  dw = jnp.einsum(f"{a_sub},{b_sub}->{a_free}{b_free}", a, b, preferred_element_type=preferred_element_type)
  return jnp.einsum(f"{a_free}{b_free}->{w_sub}", jax.lax.optimization_barrier(dw))


weight_einsum.defvjp(_weight_einsum_fwd, _weight_einsum_bwd)


def layer_norm(x_BLD: jax.Array, scale_D: jax.Array, bias_D: jax.Array | None, eps: float) -> jax.Array:
  x = x_BLD.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(var + eps) * lead(scale_D.astype(jnp.float32), x)
  if bias_D is not None:
    y = y + lead(bias_D.astype(jnp.float32), x)
  return y.astype(x_BLD.dtype)


def rms_norm(x_BLD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
  x = x_BLD.astype(jnp.float32)
  y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps)
  return (y * lead(scale_D.astype(jnp.float32), x)).astype(x_BLD.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: str = "none", factor: float = 8.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  original_max_len: int = 8192) -> jax.Array:
  """Inverse frequencies of rotary embeddings, with Llama 3.1's long-context rescaling.

  Llama 3.1 leaves high frequencies (short wavelengths) alone, divides low frequencies by
  `factor`, and interpolates smoothly between the two bands.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling == "none":
    return inv_freq
  wavelen = 2 * math.pi / inv_freq
  low_freq_wavelen = original_max_len / low_freq_factor
  high_freq_wavelen = original_max_len / high_freq_factor
  smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(is_medium, interpolated, scaled)


def apply_rope(x_BLHK: jax.Array, positions_BL: jax.Array, inv_freq_K2: jax.Array) -> jax.Array:
  """Rotates query/key heads by their positions (the half-split layout Hugging Face Llama uses)."""
  angles_BLK2 = positions_BL[..., None].astype(jnp.float32) * lead(inv_freq_K2, positions_BL[..., None])
  sin = jnp.sin(angles_BLK2)[:, :, None, :]
  cos = jnp.cos(angles_BLK2)[:, :, None, :]
  x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BLHK.dtype)


def attention_mask(q_segments_BL: jax.Array, kv_segments_BS: jax.Array, q_positions_BL: jax.Array,
                   kv_positions_BS: jax.Array, sliding_window: int = 0) -> jax.Array:
  """Which keys each query may see: same document, not in the future, inside the window.

  Causality is by position, so packed rows (positions restart per document) and a KV cache
  (keys from earlier calls) need no special case. Segment 0 is padding and sees nothing.
  A window W lets a token see itself and the W - 1 tokens before it.
  """
  same_doc = q_segments_BL[:, :, None] == kv_segments_BS[:, None, :]
  delta_BLS = q_positions_BL[:, :, None] - kv_positions_BS[:, None, :]
  mask = same_doc & (delta_BLS >= 0) & (kv_segments_BS[:, None, :] != 0)
  if sliding_window:
    mask &= delta_BLS < sliding_window
  return mask


class Segments(NamedTuple):
  """Packed self-attention given by its rows' documents, for kernels that build the mask themselves.

  Causal by index within each contiguous segment (positions restart at 0 in each); 0 is padding.
  """

  segment_ids_BL: jax.Array
  positions_BL: jax.Array


def attention(q_BLHK: jax.Array, k_BSGK: jax.Array, v_BSGK: jax.Array, mask_BLS: jax.Array | Segments,
              *, implementation: str = "xla", causal_blocks: int = 1, dropout_rate: float = 0.0,
              rng: jax.Array | None = None, sliding_window: int = 0) -> jax.Array:
  """Masked multi-head attention with grouped keys/values (G divides H); softmax in float32.

  `implementation` comes from `attention.resolve`. "cudnn" and "splash" are the fused kernels
  (`llm_jax/model/attention.py`) and take `Segments`; "xla" is `jax.nn.dot_product_attention`'s
  XLA path; "einsum" is our own: on CPU it measured 3x faster (docs/benchmarks.md), mostly by
  skipping the masked half of causal attention, and it is the one path with attention dropout.
  `sliding_window` applies to `Segments` (a dense mask has it built in).
  """
  if isinstance(mask_BLS, Segments):
    seg, pos = mask_BLS
    if implementation in kernels.FUSED:
      fused = kernels.cudnn_attention if implementation == "cudnn" else kernels.splash_attention
      return fused(q_BLHK, k_BSGK, v_BSGK, seg, sliding_window)
    mask_BLS = attention_mask(seg, seg, pos, pos, sliding_window)
  if implementation == "einsum" or (dropout_rate and rng is not None):
    return blocked_attention(q_BLHK, k_BSGK, v_BSGK, mask_BLS, causal_blocks, dropout_rate, rng)
  return jax.nn.dot_product_attention(q_BLHK, k_BSGK, v_BSGK, mask=mask_BLS[:, None], implementation="xla")


def blocked_attention(q_BLHK: jax.Array, k_BSGK: jax.Array, v_BSGK: jax.Array, mask_BLS: jax.Array,
                      causal_blocks: int = 1, dropout_rate: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
  """Einsum attention over query blocks; block i attends only to keys before the block's end.

  With `causal_blocks` > 1 the keys must be the queries' own sequence (self-attention, no
  cache): then no key after a query's index can be visible to it, whatever the segments and
  positions, and skipping those keys saves up to half of the work.

  Laid out for CPUs, where each choice below measured faster forward and backward: heads
  first ([B, G, R, L, K]) so every head's products are contiguous, the 1/sqrt(K) scale on the
  queries rather than the logits, the mask as an additive bias (its gradient is the identity,
  not a select), and the softmax normalised after the product with the values, on [L, K]
  instead of [L, S].
  """
  length = q_BLHK.shape[1]
  if length % causal_blocks or k_BSGK.shape[1] != length:
    causal_blocks = 1
  size = length // causal_blocks
  batch, _, heads, head_dim = q_BLHK.shape
  kv_heads = k_BSGK.shape[2]
  q_BGRLK = (q_BLHK * (1.0 / math.sqrt(head_dim))).reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
  q_BGRLK = q_BGRLK.transpose(0, 2, 3, 1, 4)
  k_BGSK, v_BGSK = k_BSGK.transpose(0, 2, 1, 3), v_BSGK.transpose(0, 2, 1, 3)
  bias_BLS = jnp.where(mask_BLS, 0.0, -1e30).astype(jnp.float32)
  rngs = [None] * causal_blocks if rng is None else list(jax.random.split(rng, causal_blocks))
  outputs = []
  for i in range(causal_blocks):
    end = (i + 1) * size if causal_blocks > 1 else k_BSGK.shape[1]
    outputs.append(_attend(q_BGRLK[:, :, :, i * size:(i + 1) * size], k_BGSK[:, :, :end], v_BGSK[:, :, :end],
                           bias_BLS[:, i * size:(i + 1) * size, :end], dropout_rate, rngs[i]))
  out_BGRLK = outputs[0] if causal_blocks == 1 else jnp.concatenate(outputs, axis=3)
  return out_BGRLK.transpose(0, 3, 1, 2, 4).reshape(q_BLHK.shape)


def _attend(q_BGRLK, k_BGSK, v_BGSK, bias_BLS, dropout_rate, rng):
  logits_BGRLS = jnp.einsum("bgrlk,bgsk->bgrls", q_BGRLK, k_BGSK, preferred_element_type=jnp.float32)
  logits_BGRLS = logits_BGRLS + bias_BLS[:, None, None]
  unnormalized = jnp.exp(logits_BGRLS - jax.lax.stop_gradient(logits_BGRLS.max(-1, keepdims=True)))
  # Dropping unnormalised weights and dividing by the undropped sum is dropout on the probabilities.
  weights = dropout(unnormalized, dropout_rate, rng).astype(v_BGSK.dtype)
  out_BGRLK = jnp.einsum("bgrls,bgsk->bgrlk", weights, v_BGSK, preferred_element_type=jnp.float32)
  return (out_BGRLK / unnormalized.sum(-1)[..., None]).astype(v_BGSK.dtype)


def mlp_activation(up_BLF: jax.Array, gate_BLF: jax.Array | None, kind: str) -> jax.Array:
  """GPT-2's GELU (tanh approximation, as GPT-2 was trained) or Llama's SwiGLU, silu(gate) * up."""
  if kind == "swiglu":
    return jax.nn.silu(gate_BLF) * up_BLF
  return jax.nn.gelu(up_BLF, approximate=True)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout; a no-op without an RNG, which is how evaluation and sampling call it."""
  if not rate or rng is None:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
