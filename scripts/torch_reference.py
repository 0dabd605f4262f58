"""A nanoGPT-style PyTorch model and train step: the peer that bench_train.py measures against.

Built from an llm-jax ModelConfig so both sides train the same architecture: pre-norm blocks with
layernorm or RMSNorm, learned or rotary (half-split, as Hugging Face Llama) positions, a GELU
(tanh) or SwiGLU MLP, grouped-query heads, tied or separate output head, biases or none. Trained
in eager mode with torch.optim.AdamW as nanoGPT does, on the same random tokens. Only for
benchmarks; nothing in llm_jax imports it.

bench_train.py runs it as its own process (`python scripts/torch_reference.py --model JSON ...`,
one JSON line out), with glibc's default malloc: torch's default setting, not the huge-page
tunable llm-jax's entry points set for XLA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import types

import torch
from torch import nn
from torch.nn import functional as F


def _norm(config, d: int) -> nn.Module:
  if config.norm == "rmsnorm":
    return nn.RMSNorm(d, eps=config.norm_eps)
  return nn.LayerNorm(d, eps=config.norm_eps, bias=config.use_bias)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
  x1, x2 = x.chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
  def __init__(self, config):
    super().__init__()
    d, bias = config.d_model, config.use_bias
    self.heads, self.kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d // config.num_heads
    self.norm_1, self.norm_2 = _norm(config, d), _norm(config, d)
    self.qkv = nn.Linear(d, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=bias)
    self.out = nn.Linear(d, d, bias=bias)
    self.swiglu = config.mlp == "swiglu"
    self.up = nn.Linear(d, (2 if self.swiglu else 1) * config.d_ff, bias=bias)
    self.down = nn.Linear(config.d_ff, d, bias=bias)

  def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    b, t, _ = x.shape
    q, k, v = self.qkv(self.norm_1(x)).split(
        [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=2)
    q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
    k, v = (z.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2) for z in (k, v))
    if rope is not None:
      q, k = _rotate(q, *rope), _rotate(k, *rope)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
    x = x + self.out(y.transpose(1, 2).reshape(b, t, -1))
    h = self.up(self.norm_2(x))
    if self.swiglu:
      gate, up = h.chunk(2, dim=-1)
      h = F.silu(gate) * up
    else:
      h = F.gelu(h, approximate="tanh")
    return x + self.down(h)


class GPT(nn.Module):
  def __init__(self, config):
    super().__init__()
    self.wte = nn.Embedding(config.vocab_size, config.d_model)
    self.wpe = nn.Embedding(config.max_len, config.d_model) if config.position == "learned" else None
    self.rope_theta, self.head_dim = config.rope_theta, config.d_model // config.num_heads
    self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
    self.norm_f = _norm(config, config.d_model)
    self.head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
    for module in self.modules():  # nanoGPT's init: normal(0.02), zero biases
      if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
      if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)

  def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(idx.shape[1])
    x, rope = self.wte(idx), None
    if self.wpe is not None:
      x = x + self.wpe(positions)
    else:
      inv_freq = 1.0 / self.rope_theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
      angles = positions[:, None].float() * inv_freq[None, :]
      rope = angles.cos(), angles.sin()
    for block in self.blocks:
      x = block(x, rope)
    x = self.norm_f(x)
    logits = x @ self.wte.weight.T if self.head is None else self.head(x)
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def matmul_flops(n: int = 1024, repeats: int = 10) -> float:
  a = torch.ones(n, n)
  a @ a
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    a @ a
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def median_step_time(config, batch: int, seq_len: int, steps: int) -> tuple[float, float]:
  """(median seconds per AdamW step, final loss) on random tokens, for an llm-jax ModelConfig."""
  torch.manual_seed(0)
  model = GPT(config)
  optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
  tokens = torch.randint(0, config.vocab_size, (batch, seq_len + 1))
  times = []
  for i in range(steps + 2):
    start = time.perf_counter()
    loss = model(tokens[:, :-1], tokens[:, 1:])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    if i >= 2:
      times.append(time.perf_counter() - start)
  return statistics.median(times), loss.item()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, help="an llm-jax ModelConfig as JSON (dataclasses.asdict)")
  parser.add_argument("--batch-size", type=int, required=True)
  parser.add_argument("--seq-len", type=int, required=True)
  parser.add_argument("--steps", type=int, default=25, help="timed steps after two warm-up steps")
  args = parser.parse_args()
  config = types.SimpleNamespace(**json.loads(args.model))
  step_time, loss = median_step_time(config, args.batch_size, args.seq_len, args.steps)
  print(json.dumps({"step_time_s": step_time, "loss": loss, "matmul_flops": matmul_flops(),
                    "threads": torch.get_num_threads()}))


if __name__ == "__main__":
  main()
