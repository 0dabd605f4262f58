"""Decoding strategies as pure functions: filters map logits to logits, draws map (logits, rng) to tokens.

A filter excludes tokens by setting their logits to -inf, so filters compose by plain function
composition and the draw after them never needs to know which ran. `Sampler` composes them in
the order Hugging Face's `generate` uses (temperature, then top-k, then top-p, then draw), so a
setting means the same thing in both. Everything runs in float32 whatever the compute dtype.

Dimension letters: B batch (rows), V vocab.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llm_jax.errors import UserError


def greedy(logits_BV: jax.Array, rng: jax.Array | None = None) -> jax.Array:
  """The most likely token of each row (ties go to the lowest id); `rng` is unused."""
  del rng
  return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


def categorical(logits_BV: jax.Array, rng: jax.Array) -> jax.Array:
  """One draw per row from softmax(logits); -inf logits are never drawn."""
  return jax.random.categorical(rng, logits_BV.astype(jnp.float32), axis=-1).astype(jnp.int32)


def scale_by_temperature(logits_BV: jax.Array, temperature: float) -> jax.Array:
  """softmax(logits / T): T < 1 sharpens, T > 1 flattens. T must be positive (0 means greedy)."""
  return logits_BV.astype(jnp.float32) / temperature


def top_k_filter(logits_BV: jax.Array, k: int) -> jax.Array:
  """Keeps the k largest logits of each row (and any tied with the k-th), -inf elsewhere."""
  logits_BV = logits_BV.astype(jnp.float32)
  kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
  return jnp.where(logits_BV >= kth_B1, logits_BV, -jnp.inf)


def top_p_filter(logits_BV: jax.Array, p: float) -> jax.Array:
  """Nucleus: keeps the most likely tokens until their probability reaches p, -inf elsewhere.

  A token is kept when the mass of the tokens more likely than it is below p, so the most
  likely token always survives and the kept mass is the smallest that reaches p (tokens tied
  with the last one kept are kept too).
  """
  logits_BV = logits_BV.astype(jnp.float32)
  sorted_BV = -jnp.sort(-logits_BV, axis=-1)
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  cutoff_B1 = jnp.min(jnp.where(mass_before_BV < p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BV >= cutoff_B1, logits_BV, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """temperature, top-k and top-p combined into one strategy `(logits_BV, rng) -> tokens_B`.

  Frozen and hashable so the jitted decode loop takes it as a static argument: a setting
  compiles once. temperature 0 is greedy (then top_k and top_p change nothing); top_k 0 and
  top_p 1 are off.
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise UserError(f"temperature={self.temperature}: expected >= 0 (0 is greedy)")
    if self.top_k < 0:
      raise UserError(f"top_k={self.top_k}: expected >= 0 (0 is off)")
    if not 0 < self.top_p <= 1:
      raise UserError(f"top_p={self.top_p}: expected 0 < top_p <= 1 (1 is off)")

  @property
  def is_greedy(self) -> bool:
    return self.temperature == 0

  def filter(self, logits_BV: jax.Array) -> jax.Array:
    """The logits the draw samples from: scaled, then top-k, then top-p."""
    logits_BV = scale_by_temperature(logits_BV, self.temperature)
    if self.top_k and self.top_k < logits_BV.shape[-1]:
      logits_BV = top_k_filter(logits_BV, self.top_k)
    if self.top_p < 1:
      logits_BV = top_p_filter(logits_BV, self.top_p)
    return logits_BV

  def __call__(self, logits_BV: jax.Array, rng: jax.Array) -> jax.Array:
    if self.is_greedy:
      return greedy(logits_BV)
    return categorical(self.filter(logits_BV), rng)


def sample_rows(logits_BV: jax.Array, temperature_B: jax.Array, top_p_B: jax.Array, keys_B: jax.Array) -> jax.Array:
  """One token per row, each row with its own temperature (0: greedy), top-p (1: off) and key, all traced.

  Row b draws what `Sampler(temperature_B[b], 0, top_p_B[b])` draws from it alone with key
  keys_B[b], but a batch mixing every setting compiles once (the serving engine's rows are
  independent requests).
  """
  def one(logits_V, temperature, top_p, key):
    logits_1V = logits_V[None]
    scaled_1V = scale_by_temperature(logits_1V, jnp.where(temperature > 0, temperature, 1.0))
    filtered_1V = jnp.where(top_p < 1, top_p_filter(scaled_1V, top_p), scaled_1V)
    return jnp.where(temperature > 0, categorical(filtered_1V, key)[0], greedy(logits_1V)[0])
  return jax.vmap(one)(logits_BV, temperature_B, top_p_B, keys_B)
