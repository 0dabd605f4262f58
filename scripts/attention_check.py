"""The attention kernel this machine runs, checked against XLA's float32 attention; prints one JSON line.

  python scripts/attention_check.py                       # GPU: cuDNN; TPU: splash (what model.attention=auto runs)
  python scripts/attention_check.py --implementation splash --interpret --seq-len 256   # the TPU kernel on a CPU

Packed rows (three documents and padding, and one whole document), grouped-query heads, with and
without a sliding window: the output and the gradients of q, k and v, in bfloat16 against the
same inputs through the masked XLA path in float32 (padding positions left out), and the time of
a forward and backward pass of each. Exits 1 when an error exceeds the bfloat16 tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.model import attention, layers

TOLERANCE = 5e-2  # bfloat16 inputs and outputs: 8 bits of mantissa over sums of hundreds of terms


def packed_rows(length: int, heads: int, kv_heads: int, head_dim: int):
  rng = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(rng[0], (2, length, heads, head_dim))
  k, v = (jax.random.normal(r, (2, length, kv_heads, head_dim)) for r in rng[1:3])
  cut = [length // 5, length // 2, length - length // 8]
  first = np.zeros(length, np.int32)
  first[:cut[0]], first[cut[0]:cut[1]], first[cut[1]:cut[2]] = 1, 2, 3
  segments = jnp.asarray(np.stack([first, np.ones(length, np.int32)]))
  starts = np.maximum.accumulate(np.where(np.diff(np.asarray(segments), prepend=-1) != 0, np.arange(length), 0), 1)
  positions = jnp.asarray(np.arange(length)[None] - starts, jnp.int32)
  cotangent = jax.random.normal(rng[3], q.shape) * (segments != 0)[:, :, None, None]
  return q, k, v, segments, positions, cotangent


def forward_backward(implementation: str, window: int, segments, positions, cotangent, interpret: bool):
  def loss(q, k, v):
    if implementation == "splash":
      out = attention.splash_attention(q, k, v, segments, window, interpret=interpret)
    else:
      out = layers.attention(q, k, v, layers.Segments(segments, positions), implementation=implementation,
                             sliding_window=window)
    return (out.astype(jnp.float32) * cotangent).sum(), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def timed(fn, *args, repeats: int = 10) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def check(implementation: str, seq_len: int, heads: int, kv_heads: int, head_dim: int, interpret: bool = False,
          repeats: int = 10) -> dict:
  """Errors (output absolute, gradients relative to the reference's largest) and times, per window."""
  q, k, v, segments, positions, cotangent = packed_rows(seq_len, heads, kv_heads, head_dim)
  real = (segments != 0)[:, :, None, None]
  results = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
             "implementation": implementation, "seq_len": seq_len, "heads": heads, "kv_heads": kv_heads,
             "head_dim": head_dim}
  worst = 0.0
  for window in (0, seq_len // 8):
    fast = forward_backward(implementation, window, segments, positions, cotangent, interpret)
    reference = forward_backward("xla", window, segments, positions, cotangent, False)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    (_, out), grads = fast(*low)
    (_, ref_out), ref_grads = reference(q, k, v)
    errors = {"out": float(jnp.abs(jnp.where(real, out.astype(jnp.float32) - ref_out, 0)).max())}
    for name, g, ref in zip("qkv", grads, ref_grads):
      scale = float(jnp.abs(ref).max())
      errors[f"grad_{name}"] = float(jnp.abs(g.astype(jnp.float32) - ref).max()) / max(scale, 1e-6)
    worst = max(worst, *errors.values())
    results[f"window_{window}"] = {**errors, "seconds": timed(fast, *low, repeats=repeats),
                                   "xla_bf16_seconds": timed(reference, *low, repeats=repeats)}
  results["max_error"], results["ok"] = worst, worst <= TOLERANCE
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--implementation", default="", help="cudnn, splash, xla or einsum (default: what auto runs)")
  parser.add_argument("--interpret", action="store_true", help="splash: run the Pallas program in the interpreter")
  parser.add_argument("--seq-len", type=int, default=2048)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--kv-heads", type=int, default=4)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=10, help="timed forward and backward passes of each")
  args = parser.parse_args()
  implementation = args.implementation or attention.resolve(
      "auto", attention.current_target(), dtype="bfloat16", head_dim=args.head_dim, seq_len=args.seq_len)[0]
  results = check(implementation, args.seq_len, args.heads, args.kv_heads, args.head_dim, args.interpret, args.repeats)
  print(json.dumps(results))
  sys.exit(0 if results["ok"] else 1)


if __name__ == "__main__":
  main()
