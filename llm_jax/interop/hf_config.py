"""Hugging Face transformers configs <-> llm-jax ModelConfig, for GPT-2 and the Llama family.

Only architectures and options our model reproduces exactly are accepted; anything else is a
ConversionError naming the option. The tensors are hf.py's job.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

from llm_jax import config as config_lib
from llm_jax.config import ModelConfig
from llm_jax.errors import UserError


class ConversionError(UserError):
  """A transformers folder, config or tensor that cannot be converted exactly; says which and why."""


# model_type -> the transformers class that computes it
ARCHITECTURES: dict[str, str] = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)

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
TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
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
  if model_type not in ARCHITECTURES:
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
      "architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": cfg.vocab_size,
      "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "dtype": cfg.param_dtype,
      **{key: None for key in TOKEN_KEYS}}
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
