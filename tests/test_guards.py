"""The update guard: a non-finite loss, gradient or parameter, or a loss spike, skips the update on device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_loop import read_metrics, tiny_run_args, train
from test_train_step import make_config, synthetic_batch

from llm_jax import config as config_lib
from llm_jax import sharding
from llm_jax.train import optim
from llm_jax.train import state as state_lib
from llm_jax.train import step as step_lib

import llm_jax


def compiled(config):
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  optimizer = optim.make_optimizer(config.optim, config.train.steps)
  shardings = state_lib.shardings(config.model, optimizer, mesh)
  train_step, _ = step_lib.compile_steps(config, optimizer, optim.schedule(config.optim, config.train.steps), mesh,
                                         shardings)
  state = state_lib.create(config.model, optimizer, mesh, seed=0)
  batch = jax.device_put(synthetic_batch(config.train.batch_size, config.data.seq_len, config.model.vocab_size, 0),
                         sharding.batch_sharding(mesh))
  return train_step, state, batch


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_same_tree(a, b):
  jax.tree.map(np.testing.assert_array_equal, host(a), host(b))


def test_a_nan_loss_skips_the_update_and_a_good_step_resets_the_count():
  config = make_config(config_lib.MeshConfig(data=1, fsdp=1, tensor=1))
  train_step, state, batch = compiled(config)
  state, metrics = train_step(state, batch)  # one good step, so the optimizer state is not all zeros
  assert int(metrics["skipped_steps"]) == 0
  good_params = host(state.params)  # the step below donates these buffers
  poisoned = state._replace(params={**state.params, "norm": {"scale": state.params["norm"]["scale"] * jnp.nan}})
  before = host(poisoned)
  after, metrics = train_step(poisoned, batch)
  assert not np.isfinite(float(metrics["loss"]))
  assert int(metrics["skipped_steps"]) == 1 and int(metrics["consecutive_skips"]) == 1
  assert_same_tree(after.params, before.params)
  assert_same_tree(after.opt_state, before.opt_state)
  assert int(after.step) == int(before.step) + 1  # the step is counted, so the data and schedule move on

  restored = after._replace(params=jax.tree.map(jnp.asarray, good_params))
  final, metrics = train_step(restored, batch)
  assert np.isfinite(float(metrics["loss"]))
  assert int(metrics["skipped_steps"]) == 1 and int(metrics["consecutive_skips"]) == 0
  assert not np.array_equal(host(final.params)["norm"]["scale"], good_params["norm"]["scale"])


def test_an_update_that_overflows_the_parameters_is_skipped():
  """Finite loss and gradient, but lr 1e30 would push the parameters' norm past float32: skipped."""
  config = make_config(config_lib.MeshConfig(data=1, fsdp=1, tensor=1))
  config = config_lib.replace(config, optim={"learning_rate": 1e30, "warmup_steps": 0, "schedule": "constant"})
  train_step, state, batch = compiled(config)
  before = host(state.params)
  after, metrics = train_step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert not np.isfinite(float(metrics["param_norm"]))
  assert int(metrics["skipped_steps"]) == 1
  assert_same_tree(after.params, before)


def guard(accepted, loss_mean):
  return {"skipped": jnp.int32(0), "consecutive": jnp.int32(0), "accepted": jnp.int32(accepted),
          "loss_mean": jnp.float32(loss_mean)}


def test_spike_guard_skips_only_after_its_window_and_only_spikes():
  warm = guard(step_lib.SPIKE_WINDOW, 2.0)
  accept, new = step_lib.guard_update(warm, jnp.float32(6.5), jnp.bool_(True), spike_factor=3.0)
  assert not accept and int(new["consecutive"]) == 1 and float(new["loss_mean"]) == 2.0
  accept, new = step_lib.guard_update(warm, jnp.float32(5.5), jnp.bool_(True), spike_factor=3.0)
  assert accept and int(new["accepted"]) == step_lib.SPIKE_WINDOW + 1
  assert float(new["loss_mean"]) == pytest.approx(2.0 + (5.5 - 2.0) / step_lib.SPIKE_WINDOW)
  cold = guard(3, 2.0)  # too few accepted steps to know what a spike is
  accept, new = step_lib.guard_update(cold, jnp.float32(100.0), jnp.bool_(True), spike_factor=3.0)
  assert accept and float(new["loss_mean"]) == pytest.approx(2.0 + (100.0 - 2.0) / 4)  # a plain mean so far
  accept, _ = step_lib.guard_update(warm, jnp.float32(100.0), jnp.bool_(True), spike_factor=0.0)
  assert accept  # off by default
  accept, new = step_lib.guard_update(warm, jnp.float32(1.0), jnp.bool_(False), spike_factor=0.0)
  assert not accept and int(new["skipped"]) == 1


@pytest.mark.slow
def test_a_diverging_run_stops_in_one_line_and_no_nan_reaches_a_checkpoint(shared_data, tmp_path):
  workdir = tmp_path / "run"
  result = train(tiny_run_args(shared_data, workdir, "optim.learning_rate=1e6", "optim.warmup_steps=0",
                               "train.steps=200", "train.log_every=1", "train.eval_every=0",
                               "train.checkpoint_every=3", "train.max_skipped_steps=4"))
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "updates" in lines[0] and "were skipped" in lines[0] and "learning_rate" in lines[0]
  records = read_metrics(workdir)
  assert max(records) < 20 and records[max(records)]["consecutive_skips"] >= 4
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
  assert steps, "the checkpoints before the stop are kept"
  for step in steps:
    params = llm_jax.load(workdir / "checkpoints" / str(step)).params
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params)), step
