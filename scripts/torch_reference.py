"""A nanoGPT-style PyTorch model and train step: the peer that bench_train.py measures against.

Same architecture as the gpt-10m preset (pre-norm GPT-2 blocks, GELU tanh MLP, learned
positions, tied embeddings), trained in eager mode with torch.optim.AdamW as nanoGPT does,
on the same random tokens. Only for benchmarks; nothing in llm_jax imports it.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
  def __init__(self, d: int, heads: int, d_ff: int):
    super().__init__()
    self.heads = heads
    self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
    self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
    self.c_fc, self.mlp_proj = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, t, d = x.shape
    q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
    q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
    x = x + self.c_proj(y)
    return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
  def __init__(self, vocab: int, max_len: int, layers: int, d: int, heads: int, d_ff: int):
    super().__init__()
    self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
    self.blocks = nn.ModuleList(Block(d, heads, d_ff) for _ in range(layers))
    self.ln_f = nn.LayerNorm(d)
    for module in self.modules():  # nanoGPT's init: normal(0.02), zero biases
      if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
      if isinstance(module, nn.Linear):
        nn.init.zeros_(module.bias)

  def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
    for block in self.blocks:
      x = block(x)
    logits = self.ln_f(x) @ self.wte.weight.T
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


def median_step_time(vocab: int, max_len: int, layers: int, d: int, heads: int, d_ff: int, batch: int,
                     seq_len: int, steps: int) -> tuple[float, float]:
  """(median seconds per AdamW step, final loss) on random tokens."""
  torch.manual_seed(0)
  model = GPT(vocab, max_len, layers, d, heads, d_ff)
  optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
  tokens = torch.randint(0, vocab, (batch, seq_len + 1))
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
  return statistics.median(times), float(loss)
