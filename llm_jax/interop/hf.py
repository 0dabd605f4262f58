"""Hugging Face transformers weights in and out: GPT-2 and the Llama family (Llama 2/3/3.1, Mistral, Qwen2).

Our parameter names already follow HF Llama's, so the whole correspondence is one table per
naming family (`_GPT2`, `_LLAMA`): which HF tensor holds which of our parameters and how its
layout differs. Everything else (which tensors exist, their HF shapes, import, export, the
checks) is derived from that table and from our own parameter tree, so a bias that only some
configs have (GPT-2's, Qwen2's q/k/v bias) or an untied output head needs no special case.

Layouts: torch `nn.Linear` stores [out, in]; GPT-2's `Conv1D` stores [in, out] and fuses
q|k|v into one `c_attn`; our kernels are [in..., out...] with heads split out ([D, H, K],
[H, K, D]). Conversions are reshapes, transposes, splits and concatenations only, so a round
trip is bit-exact.

Memory: import reads safetensors one tensor at a time (memory-mapped) and places each into
its sharding at once; scanned layouts are filled layer by layer into a stacked array that
already lives on the devices, so the host holds one tensor, never a second copy of the model.
Export writes shard by shard (`max_shard_bytes`), so the host holds one shard at most.

Pure functions (`config_from_hf`, `config_to_hf`, `params_from_hf`, `to_hf_state_dict`) need
no checkpoint; `import_hf` / `export_hf` are what `llm-jax convert` calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import pathlib
import re
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import config as config_lib
from llm_jax.config import ModelConfig
from llm_jax.errors import UserError
from llm_jax.model import transformer

Params = dict[str, Any]


class ConversionError(UserError):
  """A transformers folder, config or tensor that cannot be converted exactly; says which and why."""


# ---------------------------------------------------------------------------------------------
# The mapping table.


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One HF tensor and the parameter(s) of ours it holds.

  `hf`: the full HF name; "{i}" marks a per-layer tensor. `ours`: dotted paths in our tree
  (relative to one block for per-layer tensors); several paths mean HF fuses them along its
  output axis (GPT-2's c_attn = q|k|v). `layout`: "same" (identical), "vector" (ours reshaped,
  e.g. a q bias [H, K] is HF's [H*K]), "linear" (torch [out, in]) or "conv1d" ([in, out]).
  `in_axes`: how many leading axes of our kernel form HF's input dimension (o_proj: [H, K] -> 2).
  """

  hf: str
  ours: tuple[str, ...]
  layout: str = "vector"
  in_axes: int = 1


def _t(hf: str, *ours: str, layout: str = "vector", in_axes: int = 1) -> _Tensor:
  return _Tensor(hf, ours, layout, in_axes)


@dataclasses.dataclass(frozen=True)
class _Family:
  """A naming family: its tensors, the prefix some checkpoints omit, and buffers to skip."""

  prefix: str  # base-model prefix; checkpoints saved from the base model (e.g. openai's gpt2) lack it
  tensors: tuple[_Tensor, ...]
  buffers: str  # regex of non-parameter tensors older checkpoints carry (causal masks, rope tables)


_GPT2 = _Family("transformer.", (
    _t("transformer.wte.weight", "embed_tokens.embedding", layout="same"),
    _t("transformer.wpe.weight", "embed_positions.embedding", layout="same"),
    _t("transformer.h.{i}.ln_1.weight", "input_layernorm.scale"),
    _t("transformer.h.{i}.ln_1.bias", "input_layernorm.bias"),
    _t("transformer.h.{i}.attn.c_attn.weight", "self_attn.q_proj.kernel", "self_attn.k_proj.kernel",
       "self_attn.v_proj.kernel", layout="conv1d"),
    _t("transformer.h.{i}.attn.c_attn.bias", "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    _t("transformer.h.{i}.attn.c_proj.weight", "self_attn.o_proj.kernel", layout="conv1d", in_axes=2),
    _t("transformer.h.{i}.attn.c_proj.bias", "self_attn.o_proj.bias"),
    _t("transformer.h.{i}.ln_2.weight", "post_attention_layernorm.scale"),
    _t("transformer.h.{i}.ln_2.bias", "post_attention_layernorm.bias"),
    _t("transformer.h.{i}.mlp.c_fc.weight", "mlp.up_proj.kernel", layout="conv1d"),
    _t("transformer.h.{i}.mlp.c_fc.bias", "mlp.up_proj.bias"),
    _t("transformer.h.{i}.mlp.c_proj.weight", "mlp.down_proj.kernel", layout="conv1d"),
    _t("transformer.h.{i}.mlp.c_proj.bias", "mlp.down_proj.bias"),
    _t("transformer.ln_f.weight", "norm.scale"),
    _t("transformer.ln_f.bias", "norm.bias"),
    _t("lm_head.weight", "lm_head.kernel", layout="linear"),
), buffers=r"\.attn\.(masked_)?bias$")

_LLAMA = _Family("model.", (
    _t("model.embed_tokens.weight", "embed_tokens.embedding", layout="same"),
    _t("model.layers.{i}.input_layernorm.weight", "input_layernorm.scale"),
    *(t for name in ("q_proj", "k_proj", "v_proj") for t in (
        _t(f"model.layers.{{i}}.self_attn.{name}.weight", f"self_attn.{name}.kernel", layout="linear"),
        _t(f"model.layers.{{i}}.self_attn.{name}.bias", f"self_attn.{name}.bias"))),  # Qwen2
    _t("model.layers.{i}.self_attn.o_proj.weight", "self_attn.o_proj.kernel", layout="linear", in_axes=2),
    _t("model.layers.{i}.post_attention_layernorm.weight", "post_attention_layernorm.scale"),
    *(_t(f"model.layers.{{i}}.mlp.{name}.weight", f"mlp.{name}.kernel", layout="linear")
      for name in ("gate_proj", "up_proj", "down_proj")),
    _t("model.norm.weight", "norm.scale"),
    _t("lm_head.weight", "lm_head.kernel", layout="linear"),
), buffers=r"\.rotary_emb\.inv_freq$")

# model_type -> (transformers class, naming family)
_ARCHITECTURES: dict[str, tuple[str, _Family]] = {
    "gpt2": ("GPT2LMHeadModel", _GPT2),
    "llama": ("LlamaForCausalLM", _LLAMA),
    "mistral": ("MistralForCausalLM", _LLAMA),
    "qwen2": ("Qwen2ForCausalLM", _LLAMA),
}
SUPPORTED_ARCHITECTURES = tuple(_ARCHITECTURES)

_LLAMA_DEFAULTS = {"num_key_value_heads": None, "head_dim": None, "hidden_act": "silu", "rms_norm_eps": 1e-6,
                   "initializer_range": 0.02, "tie_word_embeddings": False, "attention_dropout": 0.0,
                   "attention_bias": False, "mlp_bias": False,
                   "rope_parameters": None, "rope_scaling": None, "rope_theta": 10000.0}
# What transformers assumes when a config.json omits a key (its config classes' defaults).
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": {"n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
             "embd_pdrop": 0.1, "attn_pdrop": 0.1, "resid_pdrop": 0.1, "tie_word_embeddings": True,
             "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False},
    "llama": {**_LLAMA_DEFAULTS, "max_position_embeddings": 2048},
    "mistral": {**_LLAMA_DEFAULTS, "max_position_embeddings": 131072, "sliding_window": 4096},
    "qwen2": {**_LLAMA_DEFAULTS, "max_position_embeddings": 32768, "use_sliding_window": False,
              "sliding_window": 4096, "max_window_layers": 28, "layer_types": None},
}

# HF config keys that name tokens, not architecture: kept from an imported folder for export.
_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
HF_CONFIG_FILE = "hf_config.json"  # the imported folder's config.json, kept in the workdir


# ---------------------------------------------------------------------------------------------
# Configs.


def _get(hf: Mapping[str, Any], key: str, model_type: str) -> Any:
  if key in hf:
    return hf[key]
  defaults = _HF_DEFAULTS[model_type]
  if key not in defaults:
    raise ConversionError(f"config.json of this {model_type} model lacks {key!r}")
  return defaults[key]


def _unsupported(model_type: str, what: str) -> ConversionError:
  return ConversionError(f"{model_type} with {what} is not supported: llm-jax's model would not compute the same "
                         "function")


def _param_dtype(hf: Mapping[str, Any]) -> str:
  """Keeps bfloat16 checkpoints in bfloat16 (lossless, half the memory); everything else is float32."""
  return "bfloat16" if (hf.get("dtype") or hf.get("torch_dtype")) == "bfloat16" else "float32"


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
  """Our ModelConfig for a transformers config.json (as a dict).

  Raises ConversionError for an architecture or option our model cannot reproduce exactly,
  listing the supported architectures.
  """
  model_type = hf_config.get("model_type")
  if model_type not in _ARCHITECTURES:
    raise ConversionError(f"model_type {model_type!r} (architectures {hf_config.get('architectures')}) is not "
                          f"supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
  get = functools.partial(_get, hf_config, model_type=model_type)
  cfg = _gpt2_config(get) if model_type == "gpt2" else _llama_config(get, model_type)
  cfg = dataclasses.replace(cfg, param_dtype=_param_dtype(hf_config))
  try:
    config_lib.validate_model(cfg)
  except config_lib.ConfigError as e:
    raise ConversionError(f"{model_type} config does not describe a buildable model: {e}") from None
  return cfg


def _gpt2_config(get) -> ModelConfig:
  if get("activation_function") not in ("gelu_new", "gelu_pytorch_tanh"):
    raise _unsupported("gpt2", f"activation_function={get('activation_function')!r} (llm-jax uses tanh GELU)")
  if not get("scale_attn_weights") or get("scale_attn_by_inverse_layer_idx") or get("add_cross_attention"):
    raise _unsupported("gpt2", "scale_attn_weights=False, scale_attn_by_inverse_layer_idx or add_cross_attention")
  d, heads = get("n_embd"), get("n_head")
  return ModelConfig(
      vocab_size=get("vocab_size"), max_len=get("n_positions"), num_layers=get("n_layer"), num_heads=heads,
      num_kv_heads=heads, d_model=d, d_ff=get("n_inner") or 4 * d, norm="layernorm",
      norm_eps=get("layer_norm_epsilon"), position="learned", mlp="gelu", use_bias=True, qkv_bias=False,
      tie_embeddings=get("tie_word_embeddings"), init_std=get("initializer_range"), scaled_residual_init=True,
      embed_dropout=get("embd_pdrop"), attn_dropout=get("attn_pdrop"), resid_dropout=get("resid_pdrop"))


def _rope(get, model_type: str) -> dict[str, Any]:
  """RoPE fields from transformers 5's `rope_parameters` or 4's `rope_theta` + `rope_scaling`."""
  rope = get("rope_parameters") or get("rope_scaling") or {}
  if any(isinstance(v, dict) for v in rope.values()):
    raise _unsupported(model_type, "per-layer-type RoPE parameters")
  kind = rope.get("rope_type", rope.get("type", "default"))
  if rope.get("partial_rotary_factor", 1.0) != 1.0:
    raise _unsupported(model_type, "partial rotary embeddings")
  fields = {"rope_theta": float(rope.get("rope_theta", get("rope_theta")))}
  if kind == "default":
    return fields
  if kind != "llama3":
    raise _unsupported(model_type, f"rope_type={kind!r}; supported: default, llama3")
  return {**fields, "rope_scaling": "llama3", "rope_scaling_factor": float(rope["factor"]),
          "rope_low_freq_factor": float(rope["low_freq_factor"]),
          "rope_high_freq_factor": float(rope["high_freq_factor"]),
          "rope_original_max_len": int(rope.get("original_max_position_embeddings", get("max_position_embeddings")))}


def _sliding_window(get, model_type: str) -> int:
  """Mistral slides on every layer; Qwen2 on layers >= max_window_layers (we support all or none)."""
  if model_type == "mistral":
    return get("sliding_window") or 0
  if model_type != "qwen2":
    return 0
  layers = get("num_hidden_layers")
  window = get("sliding_window") if get("use_sliding_window") else None
  kinds = set(get("layer_types") or ["sliding_attention" if window is not None and i >= get("max_window_layers")
                                     else "full_attention" for i in range(layers)])
  if kinds == {"full_attention"}:
    return 0
  if kinds == {"sliding_attention"} and get("sliding_window"):
    return get("sliding_window")
  raise _unsupported(model_type, f"layer types {sorted(kinds)} (llm-jax slides on every layer or on none)")


def _llama_config(get, model_type: str) -> ModelConfig:
  if get("hidden_act") != "silu":
    raise _unsupported(model_type, f"hidden_act={get('hidden_act')!r} (llm-jax's SwiGLU uses silu)")
  if get("attention_bias") or get("mlp_bias"):
    raise _unsupported(model_type, "attention_bias or mlp_bias (llm-jax has no gate_proj bias in its SwiGLU, nor "
                                   "q/k/v/o biases without MLP biases)")
  d, heads = get("hidden_size"), get("num_attention_heads")
  head_dim = get("head_dim") or d // heads
  return ModelConfig(
      vocab_size=get("vocab_size"), max_len=get("max_position_embeddings"), num_layers=get("num_hidden_layers"),
      num_heads=heads, num_kv_heads=get("num_key_value_heads") or heads, d_model=d, d_ff=get("intermediate_size"),
      head_dim=0 if head_dim * heads == d else head_dim, norm="rmsnorm", norm_eps=get("rms_norm_eps"),
      position="rope", mlp="swiglu", use_bias=False, qkv_bias=model_type == "qwen2",
      tie_embeddings=get("tie_word_embeddings"), sliding_window=_sliding_window(get, model_type),
      init_std=get("initializer_range"), scaled_residual_init=False, embed_dropout=0.0,
      attn_dropout=get("attention_dropout"), resid_dropout=0.0, **_rope(get, model_type))


def hf_model_type(cfg: ModelConfig) -> str:
  """The transformers architecture that computes exactly what `cfg` computes."""
  family = (cfg.position, cfg.norm, cfg.mlp)
  if family == ("learned", "layernorm", "gelu"):
    if (cfg.use_bias and cfg.num_kv_heads == cfg.num_heads and cfg.dim_per_head * cfg.num_heads == cfg.d_model
        and not cfg.sliding_window):
      return "gpt2"
  elif family == ("rope", "rmsnorm", "swiglu") and not cfg.use_bias:
    if cfg.qkv_bias:
      return "qwen2"
    return "mistral" if cfg.sliding_window else "llama"
  raise ConversionError(
      f"this model (position={cfg.position}, norm={cfg.norm}, mlp={cfg.mlp}, use_bias={cfg.use_bias}, "
      f"qkv_bias={cfg.qkv_bias}, sliding_window={cfg.sliding_window}) has no transformers equivalent; exportable: "
      "GPT-2 (learned/layernorm/gelu with biases, no GQA or window), Llama (rope/rmsnorm/swiglu without biases), "
      "Mistral (Llama with a window), Qwen2 (Llama with q/k/v biases)")


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """A transformers config.json (as a dict) for `cfg`.

  RoPE is written as `rope_theta` + `rope_scaling`, which transformers 4.x reads and 5.x
  converts. Token ids (bos/eos/pad) are not part of our config: export_hf carries them over
  from an imported folder, otherwise they are null.
  """
  model_type = hf_model_type(cfg)
  out: dict[str, Any] = {
      "architectures": [_ARCHITECTURES[model_type][0]], "model_type": model_type, "vocab_size": cfg.vocab_size,
      "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "dtype": cfg.param_dtype,
      **{key: None for key in _TOKEN_KEYS}}
  if model_type == "gpt2":
    return {**out, "n_positions": cfg.max_len, "n_embd": cfg.d_model, "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads, "n_inner": cfg.d_ff, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "embd_pdrop": cfg.embed_dropout, "attn_pdrop": cfg.attn_dropout,
            "resid_pdrop": cfg.resid_dropout, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "add_cross_attention": False}
  rope_scaling = None
  if cfg.rope_scaling == "llama3":
    rope_scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                    "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                    "original_max_position_embeddings": cfg.rope_original_max_len}
  out.update(hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.num_layers,
             num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.dim_per_head,
             hidden_act="silu", max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
             rope_theta=cfg.rope_theta, rope_scaling=rope_scaling, attention_dropout=cfg.attn_dropout)
  if model_type == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  elif model_type == "mistral":
    out.update(sliding_window=cfg.sliding_window)
  else:  # qwen2: every layer slides (max_window_layers=0) or none does
    window = cfg.sliding_window or None
    out.update(use_sliding_window=window is not None, sliding_window=window,
               max_window_layers=0 if window else cfg.num_layers,
               layer_types=["sliding_attention" if window else "full_attention"] * cfg.num_layers)
  return out


# ---------------------------------------------------------------------------------------------
# Tensors.


@dataclasses.dataclass(frozen=True)
class _Slot:
  """One HF tensor a given config has: its name, rule, layer and shapes (ours per part, HF's)."""

  name: str
  rule: _Tensor
  layer: int | None
  parts: tuple[tuple[int, ...], ...]
  shape: tuple[int, ...]


def _at(tree: Params, path: str) -> Any:
  for key in path.split("."):
    tree = tree[key]
  return tree


def _has(tree: Params, path: str) -> bool:
  try:
    _at(tree, path)
  except KeyError:
    return False
  return True


def _put(tree: Params, path: str, value: Any) -> None:
  *parents, last = path.split(".")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[last] = value


def _fan(rule: _Tensor, shape: tuple[int, ...]) -> tuple[int, int]:
  """(fan_in, fan_out) of one part: HF's matrix dimensions, or (1, size) for a vector."""
  if rule.layout == "vector":
    return 1, math.prod(shape)
  return math.prod(shape[:rule.in_axes]), math.prod(shape[rule.in_axes:])


def _hf_shape(rule: _Tensor, parts: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
  if rule.layout == "same":
    return parts[0]
  fan_in = _fan(rule, parts[0])[0]
  fan_out = sum(_fan(rule, p)[1] for p in parts)
  return {"vector": (fan_out,), "conv1d": (fan_in, fan_out), "linear": (fan_out, fan_in)}[rule.layout]


def _family(cfg: ModelConfig) -> _Family:
  return _ARCHITECTURES[hf_model_type(cfg)][1]


def _slots(cfg: ModelConfig) -> list[_Slot]:
  """Every HF tensor `cfg` has, rule by rule and layer by layer (the order import and export use).

  A rule applies when our parameter tree has its parameters: biases, lm_head and
  embed_positions exist exactly when the config says, so the table needs no conditions.
  """
  abstract = transformer.abstract_params(dataclasses.replace(cfg, scan_layers=False))
  block = abstract["layers"]["0"]
  slots = []
  for rule in _family(cfg).tensors:
    per_layer = "{i}" in rule.hf
    tree = block if per_layer else abstract
    if not all(_has(tree, path) for path in rule.ours):
      continue
    parts = tuple(tuple(_at(tree, path).shape) for path in rule.ours)
    for layer in range(cfg.num_layers) if per_layer else [None]:
      slots.append(_Slot(rule.hf.format(i=layer), rule, layer, parts, _hf_shape(rule, parts)))
  return slots


def _split_from_hf(rule: _Tensor, array: np.ndarray, parts: tuple[tuple[int, ...], ...]) -> list[np.ndarray]:
  if rule.layout == "same":
    return [array]
  sizes = [_fan(rule, p)[1] for p in parts]
  pieces = np.split(array, np.cumsum(sizes)[:-1], axis=1 if rule.layout == "conv1d" else 0)
  if rule.layout == "linear":
    pieces = [p.T for p in pieces]
  return [p.reshape(shape) for p, shape in zip(pieces, parts)]


def _join_to_hf(rule: _Tensor, arrays: list[np.ndarray]) -> np.ndarray:
  if rule.layout == "same":
    return np.ascontiguousarray(arrays[0])
  pieces = [a.reshape(_fan(rule, a.shape)) for a in arrays]  # [fan_in, fan_out]; vectors [1, n]
  joined = np.concatenate(pieces, axis=1) if len(pieces) > 1 else pieces[0]
  if rule.layout == "vector":
    joined = joined.reshape(-1)
  elif rule.layout == "linear":
    joined = joined.T
  return np.ascontiguousarray(joined)


def _canonical(name: str, family: _Family) -> str:
  return name if name.startswith(family.prefix) or name == "lm_head.weight" else family.prefix + name


def _match_names(keys: list[str], slots: list[_Slot], cfg: ModelConfig) -> dict[str, str]:
  """{HF name the config needs: key in the source}; fails naming missing and unexpected tensors."""
  family = _family(cfg)
  present = {_canonical(k, family): k for k in keys}
  needed = {slot.name for slot in slots}
  ignored = re.compile(family.buffers + (r"|^lm_head\.weight$" if cfg.tie_embeddings else ""))
  missing = sorted(needed - set(present))
  unexpected = sorted(name for name in present if name not in needed and not ignored.search(name))
  model = f"a {hf_model_type(cfg)} model with {cfg.num_layers} layers"
  if missing:
    raise ConversionError(f"{len(missing)} tensor(s) that {model} needs are missing: {_some(missing)}; "
                          "do config.json and the weights come from the same model?")
  if unexpected:
    raise ConversionError(f"{len(unexpected)} unexpected tensor(s) for {model}: {_some(unexpected)}; the weights "
                          "do not match config.json, or carry modules llm-jax does not have")
  return {name: present[name] for name in needed}


def _some(names: list[str], limit: int = 8) -> str:
  return ", ".join(names[:limit]) + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _read(tensors: Mapping[str, Any], key: str, slot: _Slot, dtype: np.dtype) -> list[np.ndarray]:
  """One HF tensor, checked, split into our parts and cast; only now is its data read."""
  tensor = tensors[key]
  if tuple(tensor.shape) != slot.shape:
    raise ConversionError(f"tensor {key} has shape {tuple(tensor.shape)}, but the config implies {slot.shape}")
  array = np.asarray(tensor)
  if not jnp.issubdtype(array.dtype, jnp.floating):
    raise ConversionError(f"tensor {key} has dtype {array.dtype}; expected a floating-point tensor "
                          "(float32, bfloat16 or float16)")
  return [part.astype(dtype, copy=False) for part in _split_from_hf(slot.rule, array, slot.parts)]


def _without_layer_axis(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
  """The sharding of one layer's slice of a stacked parameter."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
  return sharding


@functools.partial(jax.jit, donate_argnums=0)
def _write_layer(stacked: jax.Array, layer_value: jax.Array, index: jax.Array) -> jax.Array:
  """stacked[index] = layer_value in place (donated), on whatever devices `stacked` lives."""
  return jax.lax.dynamic_update_index_in_dim(stacked, layer_value, index, 0)


def params_from_hf(tensors: Mapping[str, Any], cfg: ModelConfig, shardings: Params | None = None) -> Params:
  """Our parameters (layout per cfg.scan_layers, dtype cfg.param_dtype) from HF-named tensors.

  `tensors` maps HF names to arrays: numpy arrays, or lazy tensors (`SafetensorsReader`)
  whose data is read only when converted, one at a time. `shardings` (a tree like
  `transformer.abstract_params(cfg)`, e.g. from `sharding.param_shardings`) places each
  tensor as it is read; by default everything lands on the first device. Missing and
  unexpected tensors fail, named, before any data is read; shape and dtype are checked
  tensor by tensor as they are read.
  """
  slots = _slots(cfg)
  names = _match_names(list(tensors.keys()), slots, cfg)
  dtype = jnp.dtype(cfg.param_dtype)
  abstract = transformer.abstract_params(cfg)
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  params: Params = {}
  for slot in slots:
    for path, value in zip(slot.rule.ours, _read(tensors, names[slot.name], slot, dtype)):
      if slot.layer is None:
        _put(params, path, jax.device_put(value, _at(shardings, path)))
      elif cfg.scan_layers:  # fill the stacked array on the devices, one layer at a time
        path = f"layers.{path}"
        sharding = _at(shardings, path)
        stacked = _at(params, path) if slot.layer else jnp.zeros(_at(abstract, path).shape, dtype, device=sharding)
        layer_value = jax.device_put(value, _without_layer_axis(sharding))
        _put(params, path, _write_layer(stacked, layer_value, np.int32(slot.layer)))
      else:
        path = f"layers.{slot.layer}.{path}"
        _put(params, path, jax.device_put(value, _at(shardings, path)))
  return params


def _hf_tensor(params: Params, slot: _Slot, scanned: bool) -> np.ndarray:
  def ours(path: str) -> np.ndarray:
    if slot.layer is None:
      return np.asarray(_at(params, path))
    if scanned:
      return np.asarray(_at(params, f"layers.{path}")[slot.layer])
    return np.asarray(_at(params, f"layers.{slot.layer}.{path}"))
  return _join_to_hf(slot.rule, [ours(path) for path in slot.rule.ours])


def iter_hf_tensors(params: Params, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, tensor) pairs one at a time, in HF layout and our parameters' dtype.

  Params may be scanned or unscanned whatever cfg.scan_layers says. A tied output head has
  no tensor of its own (transformers ties it to the embedding on load).
  """
  scanned = transformer.is_scanned(params)
  for slot in _slots(cfg):
    yield slot.name, _hf_tensor(params, slot, scanned)


def to_hf_state_dict(params: Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Every HF tensor at once (a second copy of the model on the host: use `save_hf` for big ones)."""
  return dict(iter_hf_tensors(params, cfg))


# ---------------------------------------------------------------------------------------------
# Folders.


class _LazyTensor:
  """One safetensors tensor: shape known, data read by np.asarray only."""

  def __init__(self, handle: Any, name: str):
    self._handle, self._name = handle, name
    self.shape = tuple(handle.get_slice(name).get_shape())

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    array = self._handle.get_tensor(self._name)
    return array if dtype is None else array.astype(dtype)


class SafetensorsReader(Mapping[str, _LazyTensor]):
  """The tensors of a transformers folder (model.safetensors, or shards listed by the index),
  memory-mapped and read one at a time. Use as a context manager; it closes the files."""

  def __init__(self, hf_dir: str | pathlib.Path):
    from safetensors import safe_open
    hf_dir = pathlib.Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
      files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
      files = ["model.safetensors"]
    else:
      raise ConversionError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json; for a "
                            "pytorch_model.bin folder, re-save it with transformers' save_pretrained first")
    self._stack = contextlib.ExitStack()
    self._where: dict[str, Any] = {}
    for file in files:
      if not (hf_dir / file).is_file():
        raise ConversionError(f"{index} lists {file}, which is missing from {hf_dir}")
      handle = self._stack.enter_context(safe_open(str(hf_dir / file), framework="np"))
      self._where.update({name: handle for name in handle.keys()})

  def __getitem__(self, name: str) -> _LazyTensor:
    return _LazyTensor(self._where[name], name)

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)

  def close(self) -> None:
    self._stack.close()

  def __enter__(self) -> SafetensorsReader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_hf_config(hf_dir: str | pathlib.Path) -> dict[str, Any]:
  path = pathlib.Path(hf_dir) / "config.json"
  if not path.is_file():
    raise ConversionError(f"{path} not found; pass a local transformers model folder (config.json + safetensors)")
  return json.loads(path.read_text())


def load_hf(hf_dir: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None,
            scan_layers: bool = True) -> tuple[ModelConfig, Params]:
  """Config and parameters of a transformers folder, streamed tensor by tensor.

  With `mesh`, each tensor goes straight into its sharding (`sharding.param_shardings`).
  """
  from llm_jax import sharding as sharding_lib
  cfg = dataclasses.replace(config_from_hf(read_hf_config(hf_dir)), scan_layers=scan_layers)
  shardings = None
  if mesh is not None:
    shardings = sharding_lib.param_shardings(mesh, transformer.logical_axes(cfg), transformer.abstract_params(cfg))
  with SafetensorsReader(hf_dir) as reader:
    return cfg, params_from_hf(reader, cfg, shardings)


def save_hf(params: Params, cfg: ModelConfig, out_dir: str | pathlib.Path, *,
            extra_config: Mapping[str, Any] | None = None, max_shard_bytes: int = 2 << 30) -> pathlib.Path:
  """Writes config.json and safetensors that `AutoModelForCausalLM.from_pretrained(out_dir)` loads.

  Above `max_shard_bytes` the weights go into several files with a model.safetensors.index.json,
  and only one shard is ever held on the host. `extra_config` adds or overrides keys (token ids).
  """
  from safetensors.numpy import save_file
  out = pathlib.Path(out_dir)
  if (out / "config.json").exists() or list(out.glob("*.safetensors")):
    raise ConversionError(f"{out} already holds a model; choose an empty or new folder")
  hf_config = {**config_to_hf(cfg), **(extra_config or {})}
  scanned = transformer.is_scanned(params)
  itemsize = jnp.dtype(jax.tree.leaves(params)[0].dtype).itemsize
  shards: list[list[_Slot]] = [[]]
  size = 0
  for slot in _slots(cfg):
    nbytes = math.prod(slot.shape) * itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(slot)
    size += nbytes
  out.mkdir(parents=True, exist_ok=True)
  files = ["model.safetensors"] if len(shards) == 1 else [
      f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
  weight_map, total = {}, 0
  for file, shard in zip(files, shards):
    tensors = {slot.name: _hf_tensor(params, slot, scanned) for slot in shard}
    total += sum(t.nbytes for t in tensors.values())
    save_file(tensors, str(out / file), metadata={"format": "pt"})
    weight_map.update({name: file for name in tensors})
    del tensors
  if len(files) > 1:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
  (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
  return out


def import_hf(hf_dir: str | pathlib.Path, out_workdir: str | pathlib.Path) -> str:
  """`llm-jax convert --from-hf DIR --out WORKDIR`: a parameters-only checkpoint of a transformers folder.

  The workdir is what `llm_jax.load`, `llm-jax generate` and `train.init_from` read. A
  sentencepiece tokenizer.model comes along; the folder's config.json is kept as
  hf_config.json so an export restores its token ids.
  """
  from llm_jax import checkpoint
  hf_dir, out = pathlib.Path(hf_dir), pathlib.Path(out_workdir).absolute()
  hf_config = read_hf_config(hf_dir)
  model_cfg, params = load_hf(hf_dir)
  data = config_lib.DataConfig()
  tokenizer = hf_dir / "tokenizer.model"
  data = dataclasses.replace(data, seq_len=min(data.seq_len, model_cfg.max_len),
                             tokenizer=str(out / "tokenizer.model") if tokenizer.is_file() else data.tokenizer)
  written = checkpoint.save_params(out, params, config_lib.Config(model=model_cfg, data=data))
  if tokenizer.is_file():
    shutil.copy(tokenizer, written / "tokenizer.model")
  (written / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True))
  return str(written)


def export_hf(workdir: str | pathlib.Path, out_dir: str | pathlib.Path) -> str:
  """`llm-jax convert --to-hf WORKDIR --out DIR`: the latest parameters as a transformers folder.

  Reads parameters and config the way `llm_jax.load` does, but without building a tokenizer:
  export only copies the tokenizer.model file, which may be a foreign sentencepiece model
  (e.g. Llama 2's) that llm-jax's tokenizer does not accept. Token ids come from the
  workdir's hf_config.json when it was imported.
  """
  from llm_jax import checkpoint
  workdir = pathlib.Path(workdir)
  params, config = checkpoint.restore_params(workdir)
  source = workdir / HF_CONFIG_FILE
  extra = {}
  if source.is_file():
    extra = {k: v for k, v in json.loads(source.read_text()).items() if k in _TOKEN_KEYS}
  out = save_hf(params, config.model, out_dir, extra_config=extra)
  if (workdir / "tokenizer.model").is_file():
    shutil.copy(workdir / "tokenizer.model", out / "tokenizer.model")
  return str(out)
