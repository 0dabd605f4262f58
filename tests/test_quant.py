"""Weight-only int8 (model/quant.py): the rounding, the model computing with it, export and load.

The model's int8 path must compute what the float model computes on the dequantized weights
Q x s: that pins each scale to its output channels (a scale on the wrong axis gives other
logits), and the float model's own tests cover the rest.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llm_jax
from llm_jax import checkpoint, cli
from llm_jax import config as config_lib
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.model import presets, quant, transformer

VOCAB = tokenizer_lib.BYTE_VOCAB_SIZE
GPT2 = dataclasses.replace(presets.get("tiny-gpt2"), vocab_size=VOCAB, init_std=0.2)  # tied head
LLAMA = dataclasses.replace(presets.get("tiny-llama"), vocab_size=VOCAB, init_std=0.2)  # untied head, GQA, swiglu
CASES = {"gpt2-scanned": GPT2, "llama-unscanned": dataclasses.replace(LLAMA, scan_layers=False)}
TOKENS = np.asarray([[5, 9, 17, 33, 2, 71, 8, 100], [40, 41, 42, 43, 44, 45, 46, 47]], np.int32)


def _dequantized_node(node, name, axis):
  """node[name] as float: int8 times the scale, broadcast over the input axes that were removed at `axis`."""
  q, scale = node[name], node[name + "_scale"]
  scale = scale.reshape(scale.shape[:axis] + (1,) * (q.ndim - scale.ndim) + scale.shape[axis:])
  rest = {k: v for k, v in node.items() if k != name + "_scale"}
  return {**rest, name: q.astype(jnp.float32) * scale}


def dequantized(params):
  """The float parameters an int8 tree stands for (written here from the layout, not with quant.py's code)."""
  lead = 1 if transformer.is_scanned(params) else 0

  def walk(tree):
    return {k: (_dequantized_node(v, "kernel", lead) if k.endswith("_proj") else
                walk(v) if isinstance(v, dict) else v) for k, v in tree.items()}

  out = {**params, "layers": walk(params["layers"])}
  if "embedding_scale" in params["embed_tokens"]:
    out["embed_tokens"] = _dequantized_node(params["embed_tokens"], "embedding", 1)
  if "lm_head" in params and "kernel_scale" in params["lm_head"]:
    out["lm_head"] = _dequantized_node(params["lm_head"], "kernel", 0)
  return out


def float_params(cfg):
  params = transformer.init_params(dataclasses.replace(cfg, scan_layers=True), jax.random.key(1))
  return params if cfg.scan_layers else transformer.unstack_layers(params)


def test_rounding_is_symmetric_per_output_channel():
  """One scale per (layer, head, head dim) of a stacked q_proj [N, D, H, K]: the channel's largest |w| maps to
  127, every weight lands within half a step, and a channel of zeros stays zeros."""
  params = float_params(GPT2)
  w = np.array(params["layers"]["self_attn"]["q_proj"]["kernel"])
  w[0, :, 0, 0] = 0.0
  w[1, :, 2, 3] *= 1000.0  # a loud channel must not coarsen the others
  params["layers"]["self_attn"]["q_proj"]["kernel"] = jnp.asarray(w)
  node = quant.quantize(params)["layers"]["self_attn"]["q_proj"]
  q, scale = np.asarray(node["kernel"]), np.asarray(node["kernel_scale"])
  assert q.dtype == np.int8 and scale.shape == (w.shape[0], *w.shape[2:]) and scale.dtype == np.float32
  amax = np.abs(w).max(axis=1)
  nonzero = amax > 0
  np.testing.assert_allclose(scale[nonzero], amax[nonzero] / 127, rtol=1e-6)
  assert np.all(np.abs(q).max(axis=1)[nonzero] == 127) and np.all(q[0, :, 0, 0] == 0)
  assert np.all(np.abs(q.astype(np.float32) * scale[:, None] - w) <= scale[:, None] / 2 * (1 + 1e-5))
  assert scale[1, 2, 3] > 500 * np.median(scale)


@pytest.mark.parametrize("cfg", CASES.values(), ids=CASES.keys())
def test_int8_logits_are_those_of_the_dequantized_weights(cfg):
  """The forward runs on the tree with the embeddings in int8 too, so it passes every place a weight is used."""
  params = float_params(cfg)
  for embeddings in (False, True):
    q = quant.quantize(params, embeddings)
    paths = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(q)}
    projections = [x for name, x in paths.items() if "_proj']['kernel']" in name]
    assert len(projections) == (1 if cfg.scan_layers else cfg.num_layers) * (7 if cfg.mlp == "swiglu" else 6)
    assert all(x.dtype == jnp.int8 for x in projections)
    assert (q["embed_tokens"]["embedding"].dtype == jnp.int8) == embeddings
    if not cfg.tie_embeddings:
      assert (q["lm_head"]["kernel"].dtype == jnp.int8) == embeddings
  forward = jax.jit(transformer.forward, static_argnames="cfg")
  logits_int8 = forward(q, cfg=cfg, tokens_BL=TOKENS)
  np.testing.assert_allclose(logits_int8, forward(dequantized(q), cfg=cfg, tokens_BL=TOKENS), atol=2e-4, rtol=2e-4)
  float_logits = forward(params, cfg=cfg, tokens_BL=TOKENS)
  assert np.any(logits_int8 != float_logits)  # rounded, but nearly the same model (real figures: docs/serving.md)
  assert np.corrcoef(np.ravel(logits_int8), np.ravel(float_logits))[0, 1] > 0.99


def param_bytes(params) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(params))


def test_export_quantize_int8_is_what_load_and_generate_run(tmp_path, capsys):
  """`llm-jax export --quantize int8` writes int8 weights that `llm_jax.load` restores as they were written: the
  handle's logits are the int8 model's, generation and log-likelihoods run, and the bytes are about half of bf16."""
  config = config_lib.Config(model=LLAMA)
  params = transformer.init_params(LLAMA, jax.random.key(2))
  checkpoint.save_params(tmp_path / "model", params, config)
  tokenizer_lib.ByteTokenizer().save(tmp_path / "model")
  export = ["export", "--workdir", str(tmp_path / "model"), "--dtype", "bfloat16", "--out"]
  assert cli.main([*export, str(tmp_path / "bf16")]) == 0
  assert cli.main([*export, str(tmp_path / "int8"), "--quantize", "int8", "--quantize-embeddings"]) == 0
  model = llm_jax.load(tmp_path / "int8")
  assert model.config.model.quantize == "int8" and model.config.model.quantize_embeddings
  expected = quant.cast(quant.quantize(transformer.unstack_layers(params), embeddings=True), "bfloat16")
  assert jax.tree.structure(model.params) == jax.tree.structure(expected)
  assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(jax.tree.leaves(model.params),
                                                                         jax.tree.leaves(expected)))
  np.testing.assert_allclose(model.logits(TOKENS), transformer.forward(expected, LLAMA, TOKENS), atol=1e-5)
  assert param_bytes(model.params) <= 0.55 * param_bytes(llm_jax.load(tmp_path / "bf16").params)
  (text,) = model.generate(["abc"], max_new_tokens=5)
  assert isinstance(text, str)
  log_p, _ = model.log_likelihood([5, 9, 17], [33, 2])
  assert np.isfinite(log_p) and log_p < 0

  capsys.readouterr()
  assert cli.main(["export", "--workdir", str(tmp_path / "int8"), "--out", str(tmp_path / "again"), "--quantize",
                   "int8"]) == 2
  assert "is already quantized (int8); export the float checkpoint it came from" in capsys.readouterr().err
  assert cli.main([*export, str(tmp_path / "x"), "--quantize-embeddings"]) == 2
  assert "--quantize-embeddings quantizes along with the projections; add --quantize int8" in capsys.readouterr().err
  assert cli.main(["convert", "--to-hf", str(tmp_path / "int8"), "--out", str(tmp_path / "hf")]) == 2
  assert "holds int8 weights, which transformers' checkpoints do not" in capsys.readouterr().err
  assert not any((tmp_path / name).exists() for name in ("again", "x", "hf"))
  with pytest.raises(config_lib.ConfigError, match="model.quantize='int8' is for inference: int8 weights do not train"):
    config_lib.validate(config_lib.replace(config, model={"quantize": "int8"}), 1)
