"""Optax optimizers, learning-rate schedules and the weight-decay mask."""

from __future__ import annotations

from typing import Any

import jax
import optax

from llm_jax.config import OptimConfig


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then cosine, linear, warmup-stable-decay or constant.

  Every decaying schedule ends at `min_lr_ratio x peak` on the last step.
  """
  peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  rest = max(total_steps - warmup, 1)
  ramp = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
  if cfg.schedule == "cosine":
    tail = optax.cosine_decay_schedule(peak, rest, alpha=cfg.min_lr_ratio)
  elif cfg.schedule == "linear":
    tail = optax.linear_schedule(peak, floor, rest)
  elif cfg.schedule == "wsd":
    decay = max(int(rest * cfg.decay_fraction), 1)
    tail = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)], [rest - decay])
  else:
    tail = optax.constant_schedule(peak)
  return optax.join_schedules([ramp, tail], [warmup])


def decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
  """True for weights that take weight decay: matmul kernels (and embeddings if asked).

  Norm scales and biases are never decayed: shrinking them towards zero only hurts.
  """
  def decays(path, _):
    name = jax.tree_util.keystr(path, simple=True, separator=".")
    if name.endswith(".kernel"):
      return True
    return decay_embeddings and name.endswith(".embedding")
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  """The optax chain: global-norm clipping, then the optimizer with its schedule and masked decay."""
  lr = schedule(cfg, total_steps)
  mask = lambda params: decay_mask(params, cfg.decay_embeddings)  # noqa: E731
  if cfg.name == "adamw":
    opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
  elif cfg.name == "lion":
    opt = optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask)
  elif cfg.name == "adafactor":
    # optax.adafactor adds its decay after its learning-rate scaling, so the decay would not
    # follow the schedule (kernels shrank by weight_decay every step, even at lr 0). Without
    # its lr it returns -(update + wd * param); scaling that by lr gives AdamW's -lr * (u + wd * p).
    opt = optax.chain(optax.adafactor(None, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=mask),
                      optax.scale_by_learning_rate(lr, flip_sign=False))
  else:  # sgd: decay enters the gradient before momentum, as torch.optim.SGD does it
    opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask), optax.sgd(lr, momentum=cfg.momentum))
  if cfg.grad_clip:
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
  return opt

