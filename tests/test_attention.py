"""Attention kernels: which one runs where (the resolution table and its errors), and every kernel
path jax can run on CPU (XLA, our einsum, splash in Pallas interpret mode) against a plain reference
on packed, causal, sliding-window and grouped-query inputs. cuDNN's kernel needs an NVIDIA GPU; its
segment offsets are checked here, the kernel by scripts/device_check.sh."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import sharding
from llm_jax.config import MeshConfig
from llm_jax.model import attention, layers, presets, transformer

CPU, TPU = attention.Target("cpu"), attention.Target("tpu")
H100 = attention.Target("cuda", "9.0", 90800)
A100 = attention.Target("cuda", "8.0", 90800)
BASE = dict(dtype="bfloat16", head_dim=64, seq_len=1024)


def resolve(setting, target, **options):
  return attention.resolve(setting, target, **{**BASE, **options})


@pytest.mark.parametrize("setting,target,options,expected", [
    ("auto", CPU, {}, "einsum"),
    ("auto", CPU, {"dtype": "float32"}, "einsum"),
    ("auto", H100, {}, "cudnn"),
    ("auto", H100, {"dtype": "float16", "head_dim": 256}, "cudnn"),
    ("auto", TPU, {}, "splash"),
    ("auto", TPU, {"dtype": "float32"}, "splash"),
    ("auto", attention.Target("rocm"), {}, "xla"),
    ("cudnn", H100, {}, "cudnn"),
    ("splash", TPU, {}, "splash"),
    ("xla", H100, {}, "xla"),
    ("einsum", TPU, {}, "einsum"),
    ("xla", CPU, {}, "xla"),
    ("auto", H100, {"dense_mask": True}, "xla"),  # a KV cache: only the masked paths take it
    ("auto", CPU, {"dense_mask": True}, "einsum"),
    ("cudnn", H100, {"dense_mask": True}, "xla"),
])
def test_resolution_table(setting, target, options, expected):
  assert resolve(setting, target, **options) == (expected, "")


@pytest.mark.parametrize("target,options,fallback,case", [
    (H100, {"dtype": "float32"}, "xla", "model.dtype=float32"),
    (H100, {"head_dim": 96 + 4}, "xla", "a head size of 100"),
    (H100, {"head_dim": 512}, "xla", "a head size of 512"),
    (A100, {}, "xla", "compute capability 8.0"),
    (attention.Target("cuda", "9.0", 90100), {}, "xla", "cuDNN 90100"),
    (H100, {"attn_dropout": 0.1}, "einsum", "model.attn_dropout=0.1"),
    (TPU, {"seq_len": 1000}, "xla", "a sequence length of 1000"),
    (TPU, {"attn_dropout": 0.1}, "einsum", "model.attn_dropout=0.1"),
])
def test_auto_falls_back_and_says_why(target, options, fallback, case):
  implementation, note = resolve("auto", target, **options)
  assert implementation == fallback
  assert note.startswith(f"model.attention=auto runs {fallback} attention, not the ") and case in note


@pytest.mark.parametrize("setting,target,options,message", [
    ("cudnn", H100, {"dtype": "float32"},
     "model.attention=cudnn cannot run here: model.dtype=float32 (cuDNN's fused attention has bfloat16 and float16 "
     "kernels only); set model.dtype=bfloat16, or set model.attention=xla"),
    ("cudnn", H100, {"attn_dropout": 0.1},
     "model.attention=cudnn cannot run here: model.attn_dropout=0.1 (the fused kernel does not drop attention "
     "probabilities); set model.attn_dropout=0, or set model.attention=einsum"),
    ("cudnn", H100, {"head_dim": 100},
     "model.attention=cudnn cannot run here: a head size of 100 (cuDNN takes multiples of 8 up to 256); set "
     "model.attention=xla"),
    ("cudnn", A100, {}, "model.attention=cudnn cannot run here: compute capability 8.0 (cuDNN's attention over packed "
     "documents needs Hopper, 9.0, or newer); set model.attention=xla"),
    ("cudnn", CPU, {}, "model.attention=cudnn cannot run here: cuDNN needs an NVIDIA GPU and this backend is cpu; set "
     "model.attention=einsum"),
    ("splash", CPU, {}, "model.attention=splash cannot run here: the splash kernel needs a TPU and this backend is "
     "cpu; set model.attention=einsum"),
    ("splash", TPU, {"seq_len": 200}, "model.attention=splash cannot run here: a sequence length of 200 (the splash "
     "kernel works in blocks of 128); use a data.seq_len that is a multiple of 128, or set model.attention=xla"),
])
def test_a_kernel_asked_for_by_name_fails_in_one_line(setting, target, options, message):
  with pytest.raises(attention.AttentionError) as error:
    resolve(setting, target, **options)
  assert str(error.value) == message


def test_the_model_says_a_fallback_once_and_refuses_a_missing_kernel(capsys):
  cfg = dataclasses.replace(presets.get("tiny-llama"), attention="auto")
  attention._SAID.discard("x falls back")
  attention.say_once("x falls back")
  attention.say_once("x falls back")
  assert capsys.readouterr().err == "llm-jax: note: x falls back\n"
  assert transformer.attention_implementation(cfg) == "einsum"  # this machine is a CPU
  cudnn = dataclasses.replace(cfg, attention="cudnn")
  with pytest.raises(attention.AttentionError, match="model.attention=cudnn cannot run here"):
    jax.eval_shape(lambda p: transformer.forward(p, cudnn, jnp.zeros((1, 8), jnp.int32)),
                   transformer.abstract_params(cudnn))


def reference(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, window=0):
  """Plain softmax attention with the mask drawn from indices, in numpy float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q_BLHK, k_BSGK, v_BSGK))
  seg = np.asarray(segment_ids_BL)
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  index = np.arange(q.shape[1])
  delta = index[:, None] - index[None]
  mask = (seg[:, :, None] == seg[:, None]) & (seg[:, None] != 0) & (delta >= 0)[None]
  if window:
    mask &= (delta < window)[None]
  logits = np.einsum("blhk,bshk->bhls", q, k) / math.sqrt(q.shape[-1])
  logits = np.where(mask[:, None], logits, -1e30)  # padding rows: finite garbage, zeroed by `real`
  logits -= logits.max(-1, keepdims=True)
  weights = np.exp(logits)
  weights /= weights.sum(-1, keepdims=True)
  return real(np.einsum("bhls,bshk->blhk", weights, v), seg)


def real(out_BLHK, segment_ids_BL):
  """Outputs at padding (segment 0) zeroed: padding attends to nothing real, and kernels differ there."""
  return np.where(np.asarray(segment_ids_BL)[:, :, None, None] != 0, np.asarray(out_BLHK, np.float64), 0)


def packed_inputs(length, heads=4, kv_heads=2, head_dim=8, seed=0):
  """Two rows: three documents then padding, and one whole document."""
  rng = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(rng[0], (2, length, heads, head_dim))
  k, v = (jax.random.normal(r, (2, length, kv_heads, head_dim)) for r in rng[1:])
  cuts = [length // 5, length // 2, length - length // 8]
  first = np.zeros(length, np.int32)
  first[:cuts[0]], first[cuts[0]:cuts[1]], first[cuts[1]:cuts[2]] = 1, 2, 3
  segments = np.stack([first, np.ones(length, np.int32)])
  positions = np.stack([np.concatenate([np.arange(cuts[0]), np.arange(cuts[1] - cuts[0]),
                                        np.arange(cuts[2] - cuts[1]), np.zeros(length - cuts[2], int)]),
                        np.arange(length)]).astype(np.int32)
  return q, k, v, jnp.asarray(segments), jnp.asarray(positions)


@pytest.mark.parametrize("implementation", ["xla", "einsum"])
@pytest.mark.parametrize("window", [0, 5])
def test_masked_paths_match_the_reference(implementation, window):
  """Grouped queries (4 heads on 2 kv heads) over packed rows; test_model.py covers 1 and 4 kv heads."""
  q, k, v, seg, pos = packed_inputs(40, kv_heads=2)
  out = jax.jit(lambda *xs: layers.attention(*xs[:3], layers.Segments(*xs[3:]), implementation=implementation,
                                             sliding_window=window, causal_blocks=2 if implementation == "einsum" else 1)
                )(q, k, v, seg, pos)
  np.testing.assert_allclose(real(out, seg), reference(q, k, v, seg, window), atol=1e-5)


@pytest.fixture(scope="module")
def splash_inputs():
  return packed_inputs(128, heads=4, kv_heads=2, head_dim=16, seed=1)


@pytest.mark.parametrize("window", [0, 20])
def test_splash_in_interpret_mode_matches_the_reference(splash_inputs, window):
  """The TPU kernel's own Pallas program, run by the interpreter: packed, causal, windowed, GQA."""
  q, k, v, seg, _ = splash_inputs
  out = attention.splash_attention(q, k, v, seg, window, interpret=True)
  np.testing.assert_allclose(real(out, seg), reference(q, k, v, seg, window), atol=1e-5)


def test_splash_gradients_match_the_masked_path(splash_inputs):
  q, k, v, seg, pos = splash_inputs
  cotangent = jax.random.normal(jax.random.key(9), q.shape) * (np.asarray(seg) != 0)[:, :, None, None]

  def loss(fn):
    return lambda q, k, v: (fn(q, k, v) * cotangent).sum()

  splash = jax.grad(loss(lambda q, k, v: attention.splash_attention(q, k, v, seg, interpret=True)), (0, 1, 2))
  masked = jax.grad(loss(lambda q, k, v: layers.attention(q, k, v, layers.Segments(seg, pos))), (0, 1, 2))
  for a, b in zip(splash(q, k, v), masked(q, k, v)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_splash_sharded_over_the_mesh_matches_one_device(splash_inputs):
  """Under a (2, 2, 2) mesh the kernel runs per shard (rows over data x fsdp, heads over tensor)."""
  q, k, v, seg, _ = splash_inputs
  q, k, v, seg = (jnp.concatenate([x, x[::-1]]) for x in (q, k, v, seg))  # 4 rows for data x fsdp = 4
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  heads = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor"))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  with jax.set_mesh(mesh):
    out = jax.jit(lambda *xs: attention.splash_attention(*xs, interpret=True))(
        jax.device_put(q, heads), jax.device_put(k, heads), jax.device_put(v, heads), jax.device_put(seg, rows))
  assert out.sharding.spec[:3] == (("data", "fsdp"), None, "tensor")
  np.testing.assert_allclose(real(out, seg), reference(q, k, v, seg), atol=1e-5)


def test_segment_offsets_say_where_each_document_lies():
  seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5], [1, 2, 3, 4, 5, 6, 7, 8]], jnp.int32)
  offsets, lengths, overflow = attention.segment_offsets(seg, 4)
  np.testing.assert_array_equal(offsets, [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1], [0, 1, 2, 3, -1]])
  np.testing.assert_array_equal(lengths, [[3, 2, 1, -1], [8, -1, -1, -1], [1, 1, 1, 1]])
  np.testing.assert_array_equal(overflow, [False, False, True])
  # The documents the offsets describe give exactly the segment mask, padding excluded.
  covered = np.zeros(seg.shape, int)
  for b in range(2):
    for i, (start, n) in enumerate(zip(np.asarray(offsets[b]), np.asarray(lengths[b]))):
      if n > 0:
        covered[b, start:start + n] = i + 1
  np.testing.assert_array_equal(covered[:2] > 0, np.asarray(seg[:2]) != 0)
  same = lambda s: s[:, :, None] == s[:, None]  # noqa: E731
  np.testing.assert_array_equal(same(covered[:2]) & (covered[:2, None] > 0), same(np.asarray(seg[:2])) &
                                (np.asarray(seg[:2, None]) > 0))
