"""The jitted train step: sharding invariance, accumulation, decay mask, schedules, one compile."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_jax import config as config_lib
from llm_jax import distributed, sharding
from llm_jax.config import ConfigError
from llm_jax.model import presets
from llm_jax.train import losses, optim
from llm_jax.train import state as state_lib
from llm_jax.train import step as step_lib


def make_config(mesh=config_lib.MeshConfig(), **train):
  return config_lib.Config(model=presets.get("tiny-llama"), mesh=mesh,
                           optim=config_lib.OptimConfig(learning_rate=1e-2, warmup_steps=2),
                           data=config_lib.DataConfig(seq_len=32),
                           train=config_lib.TrainConfig(**{"batch_size": 8, "steps": 20, **train}))


def synthetic_batch(batch_size, seq_len, vocab, seed):
  tokens = np.asarray(jax.random.randint(jax.random.key(seed), (batch_size, seq_len + 1), 4, vocab), np.int32)
  segments = np.ones((batch_size, seq_len), np.int32)
  segments[:, seq_len // 2:] = 2  # two documents per row
  positions = np.concatenate([np.arange(seq_len // 2)] * 2)[None].repeat(batch_size, 0).astype(np.int32)
  mask = (np.roll(segments, -1, axis=1) == segments).astype(np.float32)
  mask[:, -1] = 0
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments, "positions": positions,
          "loss_mask": mask}


def run(config, steps=5, devices=None):
  mesh = sharding.make_mesh(config.mesh, devices)
  optimizer = optim.make_optimizer(config.optim, config.train.steps)
  schedule = optim.schedule(config.optim, config.train.steps)
  shardings = state_lib.shardings(config.model, optimizer, mesh)
  state = state_lib.create(config.model, optimizer, mesh, seed=0)
  train_step, _ = step_lib.compile_steps(config, optimizer, schedule, mesh, shardings)
  losses = []
  for i in range(steps):
    batch = jax.device_put(synthetic_batch(config.train.batch_size, config.data.seq_len, config.model.vocab_size, i % 2),
                           sharding.batch_sharding(mesh))
    with jax.transfer_guard("disallow"):
      state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses, train_step


def test_sharded_run_equals_single_device():
  assert jax.device_count() == 8
  single_cfg = make_config(config_lib.MeshConfig(data=1, fsdp=1, tensor=1))
  single_state, single_losses, _ = run(single_cfg, devices=jax.devices()[:1])
  sharded_cfg = make_config(config_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  sharded_state, sharded_losses, _ = run(sharded_cfg)
  assert single_losses[-1] < single_losses[0] - 0.05  # it learns
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
  spec = sharded_state.params["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec
  assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               jax.device_get(sharded_state.params), jax.device_get(single_state.params))


def test_microbatches_equal_one_large_batch():
  """4 microbatches of 8 rows give the update of one batch of 32 rows."""
  one_state, one_losses, _ = run(make_config(batch_size=32), steps=2)
  acc_state, acc_losses, _ = run(make_config(batch_size=32, microbatches=4), steps=2)
  np.testing.assert_allclose(acc_losses, one_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5),
               jax.device_get(acc_state.params), jax.device_get(one_state.params))


def test_compiles_once_over_ten_steps():
  _, _, train_step = run(make_config(), steps=10)
  assert train_step.jitted._cache_size() == 1


def test_weight_decay_mask_leaves_norms_and_biases():
  params = jax.tree.map(np.asarray, state_lib.init(presets.get("tiny-gpt2"), optax.identity(), 0).params)
  mask = optim.decay_mask(params)
  assert mask["layers"]["mlp"]["up_proj"]["kernel"] is True
  assert mask["layers"]["mlp"]["up_proj"]["bias"] is False
  assert mask["layers"]["input_layernorm"]["scale"] is False and mask["norm"]["bias"] is False
  assert mask["embed_tokens"]["embedding"] is False
  assert optim.decay_mask(params, decay_embeddings=True)["embed_tokens"]["embedding"] is True
  # With zero gradients, AdamW moves only decayed weights.
  cfg = config_lib.OptimConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.5, grad_clip=0.0)
  opt = optim.make_optimizer(cfg, 10)
  updates, _ = opt.update(jax.tree.map(np.zeros_like, params), opt.init(params), params)
  assert np.all(np.asarray(updates["layers"]["input_layernorm"]["scale"]) == 0)
  assert np.all(np.asarray(updates["layers"]["self_attn"]["q_proj"]["bias"]) == 0)
  kernel = params["layers"]["mlp"]["up_proj"]["kernel"]
  np.testing.assert_allclose(updates["layers"]["mlp"]["up_proj"]["kernel"], -0.1 * 0.5 * kernel, rtol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "sgd"])
def test_every_optimizer_trains_sharded(name):
  cfg = make_config(config_lib.MeshConfig(data=2, fsdp=4))
  cfg = config_lib.replace(cfg, optim={"name": name, "learning_rate": 1e-2 if name != "sgd" else 0.3})
  _, losses, _ = run(cfg, steps=4)
  assert losses[-1] < losses[0]


def test_schedule_values():
  base = dict(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
  cosine = optim.schedule(config_lib.OptimConfig(schedule="cosine", **base), 110)
  assert float(cosine(0)) == 0.0 and float(cosine(5)) == pytest.approx(0.5)
  assert float(cosine(10)) == pytest.approx(1.0)
  assert float(cosine(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # halfway down the cosine
  assert float(cosine(110)) == pytest.approx(0.1, rel=1e-5)
  linear = optim.schedule(config_lib.OptimConfig(schedule="linear", **base), 110)
  assert float(linear(60)) == pytest.approx(0.55, rel=1e-5)
  wsd = optim.schedule(config_lib.OptimConfig(schedule="wsd", decay_fraction=0.2, **base), 110)
  assert float(wsd(50)) == 1.0 and float(wsd(90)) == 1.0
  assert float(wsd(100)) == pytest.approx(0.55, rel=1e-5) and float(wsd(110)) == pytest.approx(0.1, rel=1e-5)
  constant = optim.schedule(config_lib.OptimConfig(schedule="constant", **base), 110)
  assert float(constant(5)) == pytest.approx(0.5) and float(constant(100)) == 1.0


def test_loss_mask_and_z_loss():
  config = make_config()
  params = state_lib.init(config.model, optax.identity(), 0).params
  batch = synthetic_batch(2, 32, config.model.vocab_size, 0)
  total, sums = losses.lm_loss(params, batch, None, model=config.model)
  assert float(sums["count"]) == batch["loss_mask"].sum() == 2 * 30
  masked = dict(batch, loss_mask=np.zeros_like(batch["loss_mask"]))
  assert float(losses.lm_loss(params, masked, None, model=config.model)[0]) == 0.0
  # Cross-entropy by hand on the unmasked positions.
  from llm_jax.model import transformer
  logits = transformer.forward(params, config.model, batch["inputs"], segment_ids_BL=batch["segment_ids"],
                               positions_BL=batch["positions"])
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
  np.testing.assert_allclose(total, (nll * batch["loss_mask"]).sum(), rtol=1e-5)
  np.testing.assert_allclose(sums["loss"], total, rtol=1e-6)
  log_z = jax.nn.logsumexp(logits, -1)
  z_total, z_sums = losses.lm_loss(params, batch, None, model=config.model, z_loss=1e-2)
  np.testing.assert_allclose(z_sums["loss"], total, rtol=1e-6)  # the reported loss leaves the auxiliary term out
  np.testing.assert_allclose(z_total,
                             total + 1e-2 * (log_z**2 * batch["loss_mask"]).sum(), rtol=1e-5)


def test_loss_in_chunks_equals_the_whole_sequence_at_once():
  """train.loss_chunk: the head and loss over 8 of 32 positions at a time give the same sums and
  gradients (z-loss included), and a sharded run with it the same losses as one without."""
  config = make_config()
  params = state_lib.init(config.model, optax.identity(), 0).params
  batch = synthetic_batch(2, 32, config.model.vocab_size, 0)

  def loss(chunk):
    return jax.jit(jax.value_and_grad(lambda p: losses.lm_loss(p, batch, None, model=config.model, z_loss=1e-2,
                                                               chunk=chunk)[0]))(params)

  (whole, whole_grads), (chunked, chunked_grads) = loss(0), loss(8)
  np.testing.assert_allclose(chunked, whole, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), chunked_grads, whole_grads)
  mesh = config_lib.MeshConfig(data=2, fsdp=2, tensor=2)
  _, whole_losses, _ = run(make_config(mesh), steps=3)
  _, chunked_losses, _ = run(make_config(mesh, loss_chunk=8), steps=3)
  np.testing.assert_allclose(chunked_losses, whole_losses, rtol=1e-5)
  assert chunked_losses[-1] < chunked_losses[0]


def test_cpu_device_count_is_set_before_jax_starts_and_checked_after():
  """`mesh.cpu_devices` in a fresh process gives that many devices; once JAX runs, only a match passes."""
  code = ("import os\nimport jax\nfrom llm_jax import distributed\nfrom llm_jax.config import MeshConfig\n"
          "distributed.initialize(MeshConfig(cpu_devices=3))\nprint(jax.device_count())\n"
          "print(os.environ['XLA_FLAGS'])")
  # This process's XLA_FLAGS carry conftest's watchdog setting: the fresh processes start without it.
  flags = " ".join(f for f in os.environ["XLA_FLAGS"].split() if not f.startswith(distributed.COLLECTIVE_WATCHDOG))

  def watchdog_flags(xla_flags: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env={**os.environ, "XLA_FLAGS": xla_flags})
    count, child_flags = out.stdout.splitlines()
    assert count == "3"  # the 8 devices of this test process's XLA_FLAGS are overridden
    return [f for f in child_flags.split() if f.startswith(distributed.COLLECTIVE_WATCHDOG)]

  # Its devices share the cores: XLA's 40 s watchdog on a collective's stragglers is raised, unless the user set it.
  assert watchdog_flags(flags) == [f"{distributed.COLLECTIVE_WATCHDOG}=600"]
  assert watchdog_flags(f"{flags} {distributed.COLLECTIVE_WATCHDOG}=90") == [f"{distributed.COLLECTIVE_WATCHDOG}=90"]
  distributed.set_cpu_devices(jax.device_count())  # this process already runs with 8: a match is fine
  with pytest.raises(ConfigError, match="already runs with 8 CPU devices"):
    distributed.set_cpu_devices(2)
  with pytest.raises(ConfigError, match="mesh.cpu_devices=-1"):
    config_lib.validate(config_lib.Config(mesh=config_lib.MeshConfig(cpu_devices=-1)), 8)


def test_loss_and_gradients_are_divided_by_the_global_token_count():
  """Masks of different counts per row and per microbatch: the step's loss and gradients are the sum of the
  per-token cross-entropies over the whole batch divided by its unmasked count, not by B*L and not the mean of
  the microbatches' means. SGD at lr 1 without momentum or clipping makes the update the gradient itself."""
  from llm_jax.model import transformer
  config = config_lib.replace(make_config(batch_size=16, microbatches=2), optim={
      "name": "sgd", "learning_rate": 1.0, "warmup_steps": 0, "schedule": "constant", "momentum": 0.0,
      "weight_decay": 0.0, "grad_clip": 0.0})
  mesh = sharding.make_mesh(config.mesh)
  optimizer = optim.make_optimizer(config.optim, config.train.steps)
  state = state_lib.create(config.model, optimizer, mesh, seed=0)
  params0 = jax.device_get(state.params)
  batch = synthetic_batch(16, 32, config.model.vocab_size, 3)
  # Microbatch j holds rows j, j+2, ...: even rows keep many tokens, odd rows few, each row its own count.
  counts = np.array([28 - r if r % 2 == 0 else 1 + r // 2 for r in range(16)])
  batch["loss_mask"] = (np.arange(32)[None] < counts[:, None]).astype(np.float32)
  # Targets the model finds likely in odd rows and unlikely in even rows, so the microbatches' mean losses differ.
  logits0 = np.asarray(transformer.forward(params0, config.model, batch["inputs"], segment_ids_BL=batch["segment_ids"],
                                           positions_BL=batch["positions"]))
  odd_rows = (np.arange(16) % 2 == 1)[:, None]
  batch["targets"] = np.where(odd_rows, logits0.argmax(-1), logits0.argmin(-1)).astype(np.int32)

  @jax.jit  # compiled once rather than run op by op (eagerly, the reference gradient took seconds)
  def reference_terms(params):
    logits = transformer.forward(params, config.model, batch["inputs"], segment_ids_BL=batch["segment_ids"],
                                 positions_BL=batch["positions"])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    return nll * batch["loss_mask"]

  def reference_loss(params):
    return reference_terms(params).sum() / batch["loss_mask"].sum()

  nll = np.asarray(reference_terms(params0))
  expected = nll.sum() / counts.sum()
  by_size = nll.sum() / nll.size  # "divide by B*L"
  by_micro = np.mean([nll[j::2].sum() / counts[j::2].sum() for j in range(2)])  # "mean of microbatch means"
  assert min(abs(expected - by_size), abs(expected - by_micro)) > 0.01 * expected  # the wrong ones are far off

  train_step, _ = step_lib.compile_steps(config, optimizer, optim.schedule(config.optim, config.train.steps), mesh,
                                         state_lib.shardings(config.model, optimizer, mesh))
  state, metrics = train_step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
  assert float(metrics["tokens"]) == counts.sum()
  assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
  grads = jax.jit(jax.grad(reference_loss))(params0)
  applied = jax.tree.map(lambda before, after: before - after, params0, jax.device_get(state.params))
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(applied), jax.tree.leaves(grads)):
    relative = np.linalg.norm(got - np.asarray(want)) / np.linalg.norm(want)
    assert relative < 1e-3, (jax.tree_util.keystr(path), relative)
  reference_norm = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(grads)))
  assert float(metrics["grad_norm"]) == pytest.approx(reference_norm, rel=1e-4)
