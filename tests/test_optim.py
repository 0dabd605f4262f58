"""The optax chains of optim.make_optimizer: weight decay follows the learning rate, clipping is applied."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from llm_jax import config as config_lib
from llm_jax.model import presets
from llm_jax.train import optim
from llm_jax.train import state as state_lib

NAMES = ["adamw", "lion", "adafactor", "sgd"]


def model_params():
  """Real (tiny GPT-2) parameters: kernels that decay, norms and biases that do not, an embedding."""
  return jax.tree.map(np.asarray, state_lib.init(presets.get("tiny-gpt2"), optax.identity(), 0).params)


def random_like(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return treedef.unflatten([rng.normal(size=x.shape).astype(x.dtype) for x in leaves])


def updates_after(opt, params, grads_seq):
  """Applies the updates of a sequence of gradients; returns the final parameters and the last updates."""
  opt_state = opt.init(params)
  for grads in grads_seq:
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return params, updates


@pytest.mark.parametrize("name", NAMES)
def test_learning_rate_zero_leaves_every_weight_unchanged(name):
  """Weight decay is scaled by the learning rate in every optimizer: at lr 0 nothing moves, not even kernels."""
  params = model_params()
  cfg = config_lib.OptimConfig(name=name, learning_rate=0.0, warmup_steps=0, schedule="constant", weight_decay=0.1,
                               decay_embeddings=True, grad_clip=1.0)
  opt = optim.make_optimizer(cfg, 10)
  after, _ = updates_after(opt, params, [random_like(params, seed) for seed in range(3)])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(after), params)
  # The same chain at a non-zero rate does move them: the check above is not vacuous.
  moved, _ = updates_after(optim.make_optimizer(dataclasses.replace(cfg, learning_rate=1e-2), 10), params,
                           [random_like(params, 0)])
  kernel = params["layers"]["mlp"]["up_proj"]["kernel"]
  assert np.abs(np.asarray(moved["layers"]["mlp"]["up_proj"]["kernel"]) - kernel).max() > 1e-4


def test_adafactor_decay_shrinks_kernels_by_lr_times_wd():
  """With zero gradients Adafactor's update is the decay alone: -lr * wd * param on kernels, 0 on norms."""
  params = model_params()
  lr, wd = 0.1, 0.5
  cfg = config_lib.OptimConfig(name="adafactor", learning_rate=lr, warmup_steps=0, schedule="constant",
                               weight_decay=wd, grad_clip=0.0)
  opt = optim.make_optimizer(cfg, 10)
  _, updates = updates_after(opt, params, [jax.tree.map(np.zeros_like, params)])
  kernel = params["layers"]["mlp"]["up_proj"]["kernel"]
  np.testing.assert_allclose(updates["layers"]["mlp"]["up_proj"]["kernel"], -lr * wd * kernel, rtol=1e-6)
  assert np.all(np.asarray(updates["layers"]["input_layernorm"]["scale"]) == 0)
  assert np.all(np.asarray(updates["embed_tokens"]["embedding"]) == 0)  # decay_embeddings is off
  # With real gradients the decay adds the same -lr * wd * param to the gradient's step.
  grads = random_like(params, 1)
  no_decay = optim.make_optimizer(dataclasses.replace(cfg, weight_decay=0.0), 10)
  _, with_wd = updates_after(opt, params, [grads])
  _, without_wd = updates_after(no_decay, params, [grads])
  np.testing.assert_allclose(np.asarray(with_wd["layers"]["mlp"]["up_proj"]["kernel"])
                             - np.asarray(without_wd["layers"]["mlp"]["up_proj"]["kernel"]),
                             -lr * wd * kernel, rtol=1e-4, atol=1e-7)
  # The schedule's warmup scales the decay too: at step 0 of a warmup the rate, and so the decay, is 0.
  warm = optim.make_optimizer(dataclasses.replace(cfg, warmup_steps=5), 10)
  _, first = updates_after(warm, params, [jax.tree.map(np.zeros_like, params)])
  assert np.all(np.asarray(first["layers"]["mlp"]["up_proj"]["kernel"]) == 0)


def test_gradient_clipping_scales_to_grad_clip():
  """A gradient of global norm 1000 becomes one of norm grad_clip, same direction (SGD, lr 1, no momentum)."""
  params = model_params()
  grads = random_like(params, 2)
  grads = jax.tree.map(lambda g: g * (1000.0 / float(optax.tree.norm(grads))), grads)
  assert float(optax.tree.norm(grads)) == pytest.approx(1000.0, rel=1e-5)
  cfg = config_lib.OptimConfig(name="sgd", learning_rate=1.0, warmup_steps=0, schedule="constant", momentum=0.0,
                               weight_decay=0.0, grad_clip=0.5)
  _, updates = updates_after(optim.make_optimizer(cfg, 10), params, [grads])
  # Plain numpy: the clipped step is -grad * clip / ||grad||.
  norm = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(grads)))
  expected = jax.tree.map(lambda g: -np.asarray(g, np.float64) * 0.5 / norm, grads)
  jax.tree.map(lambda u, e: np.testing.assert_allclose(u, e, rtol=1e-5, atol=1e-9), updates, expected)
  got_norm = np.sqrt(sum(np.sum(np.square(np.asarray(u, np.float64))) for u in jax.tree.leaves(updates)))
  assert got_norm == pytest.approx(0.5, rel=1e-5)
  # A gradient already inside the ball passes unchanged.
  small = jax.tree.map(lambda g: g * 1e-4, grads)  # norm 0.1
  _, small_updates = updates_after(optim.make_optimizer(cfg, 10), params, [small])
  jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -np.asarray(g), rtol=1e-6), small_updates, small)
