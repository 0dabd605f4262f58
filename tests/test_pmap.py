"""mesh.mode=pmap: the one train step under jax.pmap gives the jitted step's losses and parameters,
and a run resumes from a checkpoint of either mode in the other."""

import json

import jax
import numpy as np
import pytest
from test_train_loop import REPO
from test_train_step import make_config, run  # tests/test_train_step.py

from llm_jax import config as config_lib
from llm_jax.train import loop

DATA_PARALLEL = dict(data=8, fsdp=1, tensor=1)


def test_pmap_takes_the_steps_of_the_jitted_step():
  """8 devices, one row each; the rows' loss masks differ, so the device sums must be pooled, not averaged."""
  jit_state, jit_losses, _ = run(make_config(config_lib.MeshConfig(**DATA_PARALLEL)), steps=5)
  pmap_state, pmap_losses, _ = run(make_config(config_lib.MeshConfig(**DATA_PARALLEL, mode="pmap")), steps=5)
  assert jit_losses[-1] < jit_losses[0] - 0.05  # it learns
  np.testing.assert_allclose(pmap_losses, jit_losses, rtol=1e-6)
  assert pmap_state.params["layers"]["mlp"]["up_proj"]["kernel"].sharding.is_fully_replicated
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), jax.device_get(pmap_state.params),
               jax.device_get(jit_state.params))
  assert int(pmap_state.step) == 5


def test_pmap_with_fsdp_or_tensor_fails_in_one_line():
  config = make_config(config_lib.MeshConfig(data=2, fsdp=4, mode="pmap"))
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config, 8)
  assert str(error.value) == ("mesh.mode=pmap is pure data parallelism, but the mesh has fsdp=4 and tensor=1; set "
                              "mesh.data=-1 mesh.fsdp=1 mesh.tensor=1, or mesh.mode=jit for FSDP and tensor parallelism")
  config_lib.validate(config_lib.override(config, ["mesh.data=-1", "mesh.fsdp=1"]), 8)


def _config(shared_data, steps, mode):
  mesh = ["mesh.mode=pmap", "mesh.data=-1", "mesh.fsdp=1"] if mode == "pmap" else ["mesh.data=1", "mesh.fsdp=-1"]
  return config_lib.override(config_lib.load_file(REPO / "tests/gpt2_bytes_config.py"), [
      f"data.source=text:{shared_data / 'tiny_shakespeare/input.txt'}", "data.text_split=blank_line",
      "model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.num_kv_heads=4", "model.d_ff=128",
      "data.seq_len=32", "model.max_len=32", "train.batch_size=16", "optim.warmup_steps=1", "optim.learning_rate=3e-3",
      "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=2", "optim.schedule=constant",
      "sample.max_new_tokens=0", "mesh.cpu_devices=0", f"train.steps={steps}", *mesh])


def _losses(workdir):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_a_run_resumes_in_the_other_mode(shared_data, tmp_path):
  """Steps 1-2 under pmap, 3-4 jitted with the parameters FSDP-sharded over 8 devices, 5-6 under pmap
  again: the curve of one jitted run, each resume restoring the other mode's checkpoint."""
  straight = tmp_path / "straight"
  loop.train(_config(shared_data, 6, "jit"), straight)
  switched = tmp_path / "switched"
  for steps, mode in ((2, "pmap"), (4, "jit"), (6, "pmap")):
    loop.train(_config(shared_data, steps, mode), switched)
  expected, got = _losses(straight), _losses(switched)
  assert sorted(got) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in range(1, 7)], [expected[s] for s in range(1, 7)], rtol=1e-5)
