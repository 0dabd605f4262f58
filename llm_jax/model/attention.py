"""Which attention kernel runs where, and the two fused kernels: cuDNN's on NVIDIA GPUs, Pallas splash on TPUs.

`resolve` is a pure function of (setting, backend, dtype, head size, length, dropout, GPU
generation) -> implementation, so the table is tested on any machine:

  setting   cpu      cuda (bf16/fp16, Hopper+)   tpu      elsewhere
  auto      einsum   cudnn                       splash   xla
  cudnn     error    cudnn                       error    error
  splash    error    error                       splash   error
  xla       xla      xla                         xla      xla
  einsum    einsum   einsum                      einsum   einsum

A case a fused kernel cannot take (float32 or a head size cuDNN lacks, a pre-Hopper GPU,
dropout on the probabilities, a length splash cannot block) raises `AttentionError` naming the
case and the setting that works when the kernel was asked for by name; under `auto` it falls
back (to xla, or to einsum where dropout needs it) and says so once on stderr.

The fused kernels run on packed self-attention only (segment ids, causal by index, which equals
causal by position because positions restart at 0 in each contiguous segment). With a KV cache
or any other dense mask the masked paths run: einsum on CPUs, xla elsewhere.

Packed documents reach cuDNN without a dense mask through segment offsets: `jax.nn.
dot_product_attention` (jax 0.10) can say only one valid prefix per row (`query_seq_lengths`,
`key_value_seq_lengths`) or a dense [B, 1, L, S] `mask`/`bias`, so none of its arguments
expresses several documents in a row. cuDNN's packed layout (`q_offsets`/`kv_offsets` with
per-segment lengths) is exposed only by `jax._src.cudnn.fused_attention_stablehlo.
dot_product_attention` (the public arguments are jax PR #29731, still open), which is what
`cudnn_attention` calls. It needs Hopper and cuDNN >= 9.6, and a static bound on the documents
in a row (`CUDNN_MAX_SEGMENTS`).

Dimension letters as in layers.py; M = most segments (documents) in one row.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llm_jax.config import ConfigError

FUSED = ("cudnn", "splash")
# cuDNN's packed layout needs the most documents one row may hold before compiling; it keeps a
# float32 softmax statistic of [B x M, H, L] per layer while that layer's backward runs. A row
# with more documents gets NaN outputs, so the step's guard skips that update.
CUDNN_MAX_SEGMENTS = 64
SPLASH_BLOCK = 128  # the splash kernel's tiles: a length it runs on is a multiple of this


class AttentionError(ConfigError):
  """model.attention names a kernel that cannot run this model on this machine."""


class Target(NamedTuple):
  """What the resolution needs to know about the machine."""

  backend: str  # "cpu", "cuda", "rocm", "tpu", ...
  compute_capability: str = ""  # NVIDIA only, e.g. "9.0"
  cudnn_version: int = 0  # NVIDIA only, e.g. 90800 (0: unknown, not checked)


@functools.lru_cache(maxsize=1)
def current_target() -> Target:
  """This process's accelerator (the first device's), as `resolve` reads it."""
  device = jax.devices()[0]
  if device.platform != "gpu":
    return Target(device.platform)
  version = str(getattr(device.client, "platform_version", "")).lower()
  if "rocm" in version:
    return Target("rocm")
  try:
    from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version
    cudnn = int(check_cudnn_version())
  except Exception:  # noqa: BLE001 - no cuDNN found: the kernel would fail; the version check says so
    cudnn = -1
  return Target("cuda", str(getattr(device, "compute_capability", "")), cudnn)


class _Obstacle(NamedTuple):
  case: str  # what the kernel cannot take, e.g. "model.dtype=float32 (...)"
  fix: str  # the setting that makes the kernel run


def _cudnn_obstacle(dtype: str, head_dim: int, dropout: float, target: Target) -> _Obstacle | None:
  if target.backend != "cuda":
    return _Obstacle(f"cuDNN needs an NVIDIA GPU and this backend is {target.backend}", "")
  if dtype not in ("bfloat16", "float16"):
    return _Obstacle(f"model.dtype={dtype} (cuDNN's fused attention has bfloat16 and float16 kernels only)",
                     "set model.dtype=bfloat16")
  major = int(target.compute_capability.split(".")[0]) if target.compute_capability else 0
  if major < 9:
    return _Obstacle(f"compute capability {target.compute_capability or 'unknown'} (cuDNN's attention over "
                     "packed documents needs Hopper, 9.0, or newer)", "")
  if 0 < target.cudnn_version < 90600:
    return _Obstacle(f"cuDNN {target.cudnn_version} (packed documents need cuDNN 9.6 or newer)",
                     "install a newer cuDNN (pip install -U 'jax[cuda12]')")
  if target.cudnn_version < 0:
    return _Obstacle("no cuDNN library found", "install jax with its CUDA plugin (pip install 'jax[cuda12]')")
  if head_dim % 8 or head_dim > 256:
    return _Obstacle(f"a head size of {head_dim} (cuDNN takes multiples of 8 up to 256)", "")
  if dropout:
    return _Obstacle(f"model.attn_dropout={dropout} (the fused kernel does not drop attention probabilities)",
                     "set model.attn_dropout=0")
  return None


def _splash_obstacle(seq_len: int, dropout: float, target: Target) -> _Obstacle | None:
  if target.backend != "tpu":
    return _Obstacle(f"the splash kernel needs a TPU and this backend is {target.backend}", "")
  if seq_len % SPLASH_BLOCK:
    return _Obstacle(f"a sequence length of {seq_len} (the splash kernel works in blocks of {SPLASH_BLOCK})",
                     f"use a data.seq_len that is a multiple of {SPLASH_BLOCK}")
  if dropout:
    return _Obstacle(f"model.attn_dropout={dropout} (the fused kernel does not drop attention probabilities)",
                     "set model.attn_dropout=0")
  return None


def resolve(setting: str, target: Target, *, dtype: str, head_dim: int, seq_len: int, attn_dropout: float = 0.0,
            dense_mask: bool = False) -> tuple[str, str]:
  """(implementation, note): the kernel `model.attention=setting` runs, and why `auto` fell back ("" if not).

  `dense_mask` is attention under a KV cache (or any arbitrary mask): only the masked paths take it.
  Raises AttentionError when a kernel asked for by name cannot run.
  """
  masked = "einsum" if target.backend == "cpu" else "xla"
  if setting in ("xla", "einsum"):
    return setting, ""
  if dense_mask:
    return masked, ""
  obstacles = {"cudnn": lambda: _cudnn_obstacle(dtype, head_dim, attn_dropout, target),
               "splash": lambda: _splash_obstacle(seq_len, attn_dropout, target)}
  if setting in obstacles:
    obstacle = obstacles[setting]()
    if obstacle:
      other = "einsum" if attn_dropout else masked  # the blocked einsum is the one path with attention dropout
      fix = f"{obstacle.fix}, or set" if obstacle.fix else "set"
      raise AttentionError(f"model.attention={setting} cannot run here: {obstacle.case}; {fix} model.attention={other}")
    return setting, ""
  if setting != "auto":
    raise AttentionError(f"model.attention={setting!r}: expected auto, xla, einsum, cudnn or splash")
  wanted = {"cuda": "cudnn", "tpu": "splash"}.get(target.backend)
  if wanted is None:
    return masked, ""
  obstacle = obstacles[wanted]()
  if obstacle is None:
    return wanted, ""
  fallback = "einsum" if attn_dropout else "xla"
  fix = f"; {obstacle.fix} for the fused kernel" if obstacle.fix else ""
  return fallback, (f"model.attention=auto runs {fallback} attention, not the {wanted} kernel: {obstacle.case}{fix}")


_SAID: set[str] = set()


def say_once(note: str) -> None:
  """A fallback note on stderr, once per process however often the model is traced."""
  if note and note not in _SAID:
    _SAID.add(note)
    print(f"llm-jax: note: {note}", file=sys.stderr, flush=True)


# ---- cuDNN (NVIDIA GPUs) ----

def segment_offsets(segment_ids_BL: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(offsets [B, M + 1], lengths [B, M], overflow [B]) of the contiguous segments of each row.

  A segment is a run of one nonzero id; 0 is padding and belongs to none. Unused entries are
  -1, as cuDNN's packed layout wants. `overflow` marks rows with more than M segments (whose
  extra segments are missing from the offsets).
  """
  seg = segment_ids_BL
  previous = jnp.pad(seg[:, :-1], ((0, 0), (1, 0)))
  following = jnp.pad(seg[:, 1:], ((0, 0), (0, 1)))
  starts_BL = (seg != 0) & (seg != previous)
  ends_BL = (seg != 0) & (seg != following)

  def row(starts_L, ends_L):
    first = jnp.nonzero(starts_L, size=max_segments + 1, fill_value=-1)[0]
    last = jnp.nonzero(ends_L, size=max_segments, fill_value=-2)[0]
    return first, jnp.where(first[:-1] >= 0, last + 1 - first[:-1], -1)

  offsets_BM1, lengths_BM = jax.vmap(row)(starts_BL, ends_BL)
  offsets_BM1 = offsets_BM1.at[:, -1].set(-1)
  return offsets_BM1.astype(jnp.int32), lengths_BM.astype(jnp.int32), starts_BL.sum(-1) > max_segments


def cudnn_attention(q_BLHK: jax.Array, k_BLGK: jax.Array, v_BLGK: jax.Array, segment_ids_BL: jax.Array,
                    sliding_window: int = 0, max_segments: int = CUDNN_MAX_SEGMENTS) -> jax.Array:
  """Causal self-attention over packed documents in cuDNN's fused kernel; padding rows come out 0."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  heads, kv_heads = q_BLHK.shape[2], k_BLGK.shape[2]
  if kv_heads != heads:
    # jax 0.10's packed layout scales the key offsets by the query heads' stride, so grouped
    # keys would be read from the wrong tokens (fixed upstream in jax PR #39521): repeat them.
    k_BLGK, v_BLGK = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k_BLGK, v_BLGK))
  offsets_BM1, lengths_BM, overflow_B = segment_offsets(segment_ids_BL, max(2, min(max_segments, q_BLHK.shape[1])))
  out_BLHK = cudnn.dot_product_attention(
      q_BLHK, k_BLGK, v_BLGK, q_seqlen=lengths_BM, kv_seqlen=lengths_BM, q_offsets=offsets_BM1,
      kv_offsets=offsets_BM1, scale=1.0 / math.sqrt(q_BLHK.shape[-1]), mask_type=cudnn.MaskType.PADDING_CAUSAL,
      sliding_window_length=sliding_window or None)
  keep_BL11 = (segment_ids_BL != 0)[:, :, None, None]
  out_BLHK = jnp.where(keep_BL11, out_BLHK, 0)
  return jnp.where(overflow_B[:, None, None, None], jnp.nan, out_BLHK).astype(q_BLHK.dtype)


# ---- splash (TPUs) ----

def splash_attention(q_BLHK: jax.Array, k_BLGK: jax.Array, v_BLGK: jax.Array, segment_ids_BL: jax.Array,
                     sliding_window: int = 0, *, interpret: bool = False) -> jax.Array:
  """Causal self-attention over packed documents in the Pallas splash kernel shipped with jax.

  Under a mesh the kernel runs per shard through `shard_map`: rows split over (data, fsdp) and
  heads over tensor, as the activations already are, so no data moves for it. `interpret`
  runs the kernel's Pallas program on any backend (how the tests run it on CPU).
  """
  mesh = jax.sharding.get_abstract_mesh()
  kernel = functools.partial(_splash_local, sliding_window=sliding_window, interpret=interpret)
  if mesh.empty or not {"data", "fsdp", "tensor"} <= set(mesh.axis_names):
    return kernel(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL)
  heads_spec = P(("data", "fsdp"), None, "tensor", None)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(heads_spec, heads_spec, heads_spec, P(("data", "fsdp"), None)),
                       out_specs=heads_spec, check_vma=False)(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL)


def _splash_local(q_BLHK, k_BLGK, v_BLGK, segment_ids_BL, *, sliding_window: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  length, heads, head_dim = q_BLHK.shape[1:]
  kernel = _splash_kernel(length, heads, sliding_window, interpret)
  q_BHLK = (q_BLHK * (1.0 / math.sqrt(head_dim))).astype(q_BLHK.dtype).transpose(0, 2, 1, 3)
  k_BGLK, v_BGLK = k_BLGK.transpose(0, 2, 1, 3), v_BLGK.transpose(0, 2, 1, 3)

  def one_row(q_HLK, k_GLK, v_GLK, seg_L):
    return kernel(q_HLK, k_GLK, v_GLK, segment_ids=splash.SegmentIds(q=seg_L, kv=seg_L))

  return jax.vmap(one_row)(q_BHLK, k_BGLK, v_BGLK, segment_ids_BL).transpose(0, 2, 1, 3)


@functools.lru_cache(maxsize=16)
def _splash_kernel(length: int, heads: int, sliding_window: int, interpret: bool):
  """The kernel for one mask shape, built once: splash precomputes which blocks each mask skips."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  shape = (length, length)
  one = splash.LocalMask(shape, (sliding_window - 1, 0), offset=0) if sliding_window else splash.CausalMask(shape)
  block = min(length, 512 if length % 512 == 0 else SPLASH_BLOCK)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=SPLASH_BLOCK, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=SPLASH_BLOCK, block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mha(splash.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                                q_seq_shards=1, interpret=interpret)

