"""Named architectures. Full sizes are checked with `jax.eval_shape`, never allocated in tests."""

from __future__ import annotations

import dataclasses

from llm_jax.config import ModelConfig
from llm_jax.errors import UserError

_GPT2 = ModelConfig(vocab_size=50257, max_len=1024, norm="layernorm", position="learned", mlp="gelu",
                    use_bias=True, tie_embeddings=True, scaled_residual_init=True)
_LLAMA = ModelConfig(norm="rmsnorm", norm_eps=1e-5, position="rope", mlp="swiglu", use_bias=False,
                     tie_embeddings=False, scaled_residual_init=False)


def _gpt2(**kw) -> ModelConfig:
  kw.setdefault("num_kv_heads", kw["num_heads"])
  kw.setdefault("d_ff", 4 * kw["d_model"])
  return dataclasses.replace(_GPT2, **kw)


def _llama(**kw) -> ModelConfig:
  kw.setdefault("num_kv_heads", kw["num_heads"])
  return dataclasses.replace(_LLAMA, **kw)


PRESETS: dict[str, ModelConfig] = {
    "gpt2-124m": _gpt2(num_layers=12, num_heads=12, d_model=768),
    "gpt2-350m": _gpt2(num_layers=24, num_heads=16, d_model=1024),
    # The benchmark model of scripts/bench_*.py: fixed so figures compare across commits.
    "gpt-10m": _gpt2(num_layers=6, num_heads=6, d_model=384, d_ff=1536, vocab_size=8192, max_len=256),
    "llama2-7b": _llama(num_layers=32, num_heads=32, d_model=4096, d_ff=11008, vocab_size=32000, max_len=4096,
                        rope_theta=10000.0),
    "llama3-8b": _llama(num_layers=32, num_heads=32, num_kv_heads=8, d_model=4096, d_ff=14336, vocab_size=128256,
                        max_len=8192, rope_theta=500000.0),
    "llama3.1-8b": _llama(num_layers=32, num_heads=32, num_kv_heads=8, d_model=4096, d_ff=14336, vocab_size=128256,
                          max_len=131072, rope_theta=500000.0, rope_scaling="llama3"),
    "llama-1b": _llama(num_layers=16, num_heads=32, num_kv_heads=8, d_model=2048, d_ff=8192, vocab_size=128256,
                       max_len=2048, rope_theta=500000.0, tie_embeddings=True),
    # Tiny sizes for tests: every dimension divides a mesh of up to 8 devices.
    "tiny-gpt2": _gpt2(num_layers=2, num_heads=4, d_model=64, d_ff=128, vocab_size=256, max_len=64),
    "tiny-llama": _llama(num_layers=2, num_heads=4, num_kv_heads=2, d_model=64, d_ff=128, vocab_size=256,
                         max_len=64),
}


def get(name: str) -> ModelConfig:
  if name not in PRESETS:
    raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
  return PRESETS[name]
