"""Checkpoints on disk: resharding restores, scan layout conversion, mismatches, exports."""

import dataclasses

import jax
import numpy as np
import pytest

import llm_jax
from llm_jax import checkpoint, sharding
from llm_jax import config as config_lib
from llm_jax.model import presets, transformer
from llm_jax.train import optim
from llm_jax.train import state as state_lib

# 4 kv heads so that the model also splits over a tensor-parallel size of 4.
CONFIG = config_lib.Config(model=dataclasses.replace(presets.get("tiny-llama"), num_kv_heads=4),
                          train=config_lib.TrainConfig(batch_size=8))


def saved_run(tmp_path, mesh_cfg, model=CONFIG.model, step=3):
  """Saves a fresh train state (perturbed so no value is an init default) at `step`."""
  config = dataclasses.replace(CONFIG, model=model, mesh=mesh_cfg)
  mesh = sharding.make_mesh(mesh_cfg)
  optimizer = optim.make_optimizer(config.optim, 10)
  state = state_lib.create(model, optimizer, mesh, seed=1)
  state = state._replace(step=state.step + step, opt_state=jax.tree.map(lambda x: x + np.asarray(1, x.dtype), state.opt_state))
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
  ckpt.save(step, state.params, {"step": state.step, "opt_state": state.opt_state, "rng": state.rng},
            {"position": 7}, config)
  ckpt.wait()
  ckpt.close()
  return state, optimizer


def restore(tmp_path, mesh_cfg, optimizer, model=CONFIG.model, step=3, devices=None):
  mesh = sharding.make_mesh(mesh_cfg, devices)

  def targets(model_cfg):
    target = state_lib.abstract(model_cfg, optimizer, mesh)
    return target.params, {"step": target.step, "opt_state": target.opt_state, "rng": target.rng}

  ckpt = checkpoint.Checkpointer(tmp_path)
  params, train, data, _ = ckpt.restore(step, targets, model)
  ckpt.close()
  return params, train, data


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


@pytest.mark.parametrize("restore_mesh", [config_lib.MeshConfig(data=2, fsdp=1, tensor=4),
                                          config_lib.MeshConfig(data=1, fsdp=1, tensor=1)],
                         ids=["data2-tensor4", "one-device"])
def test_restore_onto_another_mesh(tmp_path, restore_mesh):
  saved, optimizer = saved_run(tmp_path, config_lib.MeshConfig(data=1, fsdp=8, tensor=1))
  devices = jax.devices()[:1] if restore_mesh.tensor == 1 else None
  params, train, data = restore(tmp_path, restore_mesh, optimizer, devices=devices)
  kernel = params["layers"]["mlp"]["up_proj"]["kernel"]
  expected_mesh = {"data": restore_mesh.data, "fsdp": restore_mesh.fsdp, "tensor": restore_mesh.tensor}
  assert dict(kernel.sharding.mesh.shape) == expected_mesh
  assert kernel.sharding.shard_shape(kernel.shape) == (2, 64, 128 // restore_mesh.tensor)
  assert_trees_equal(params, saved.params)
  assert_trees_equal(train["opt_state"], saved.opt_state)
  assert int(train["step"]) == 3 and data == {"position": 7}



def test_replicated_arrays_are_split_among_replicas_only_when_large(tmp_path):
  """A replicated array is written whole unless each of its 8 replicas' parts holds 1 MiB, and restores equal."""
  mesh = sharding.make_mesh(config_lib.MeshConfig(data=8, fsdp=1, tensor=1))
  replicated = sharding.replicated(mesh)
  rows = 8 * checkpoint.MIN_REPLICA_SLICE_BYTES // (4 * 1024)  # float32 rows of 1024: 1 MiB a replica
  params = {"small": jax.device_put(np.arange(64 * 64, dtype=np.float32).reshape(64, 64), replicated),
            "large": jax.device_put(np.arange(rows * 1024, dtype=np.float32).reshape(rows, 1024), replicated)}
  ckpt = checkpoint.Checkpointer(tmp_path)
  ckpt.save(1, params, {"step": np.int32(1)}, {}, CONFIG)
  ckpt.wait()
  ckpt.close()
  with checkpoint.ocp.StandardCheckpointer() as reader:
    saved = reader.metadata(tmp_path / "checkpoints/1/params").item_metadata.tree
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    restored = reader.restore(tmp_path / "checkpoints/1/params", target)
  assert saved["small"].storage.write_shape == (64, 64)
  assert saved["large"].storage.write_shape == (rows // 8, 1024)
  assert_trees_equal(restored, params)

def test_scanned_checkpoint_restores_unscanned_and_back(tmp_path):
  mesh_cfg = config_lib.MeshConfig(data=1, fsdp=8, tensor=1)
  saved, optimizer = saved_run(tmp_path / "scanned", mesh_cfg)
  unscanned_model = dataclasses.replace(CONFIG.model, scan_layers=False)
  unscanned_optimizer = optim.make_optimizer(CONFIG.optim, 10)
  params, train, _ = restore(tmp_path / "scanned", mesh_cfg, unscanned_optimizer, unscanned_model)
  assert not transformer.is_scanned(params)
  assert_trees_equal(transformer.stack_layers(params), saved.params)
  assert_trees_equal(checkpoint.convert_layouts(train["opt_state"], scanned=True), saved.opt_state)
  # And the other way: written unscanned, restored scanned.
  saved_unscanned, _ = saved_run(tmp_path / "unscanned", mesh_cfg, unscanned_model)
  params, _, _ = restore(tmp_path / "unscanned", mesh_cfg, optimizer)
  assert transformer.is_scanned(params)
  assert_trees_equal(params, transformer.stack_layers(saved_unscanned.params))


def test_other_architecture_names_first_mismatch(tmp_path):
  _, optimizer = saved_run(tmp_path, config_lib.MeshConfig(fsdp=8))
  wider = dataclasses.replace(CONFIG.model, d_ff=256)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"parameter layers.mlp.down_proj.kernel has shape \(2, 128, 64\) in the checkpoint but "
                           r"\(2, 256, 64\) in this model"):
    restore(tmp_path, config_lib.MeshConfig(fsdp=8), optim.make_optimizer(CONFIG.optim, 10), wider)
  gpt2 = presets.get("tiny-gpt2")
  with pytest.raises(checkpoint.CheckpointError, match="has no parameter .*another architecture"):
    restore(tmp_path, config_lib.MeshConfig(fsdp=8), optim.make_optimizer(CONFIG.optim, 10), gpt2)


@pytest.mark.parametrize("field, value", [("rope_theta", 500000.0), ("norm_eps", 1e-6), ("sliding_window", 8)])
def test_same_shapes_other_meaning_is_refused(tmp_path, field, value):
  """A field that changes what the parameters mean but not their shapes: a train restore and a parameters-only
  restore both refuse, naming the field and both values (the shape checks alone would let it through)."""
  saved, optimizer = saved_run(tmp_path, config_lib.MeshConfig(fsdp=8))
  other = dataclasses.replace(CONFIG.model, **{field: value})
  assert transformer.abstract_params(other) == transformer.abstract_params(CONFIG.model)
  message = (rf"saved with model\.{field}={getattr(CONFIG.model, field)!r} but this run has "
             rf"model\.{field}={value!r}")
  with pytest.raises(checkpoint.CheckpointError, match=message):
    restore(tmp_path, config_lib.MeshConfig(fsdp=8), optimizer, other)
  with pytest.raises(checkpoint.CheckpointError, match=message):
    checkpoint.restore_params(tmp_path, other)
  params, _ = checkpoint.restore_params(tmp_path, CONFIG.model)  # the saved model itself restores
  assert_trees_equal(params, saved.params)


def test_export_and_load_parameters_only(tmp_path):
  saved, _ = saved_run(tmp_path / "run", config_lib.MeshConfig(fsdp=8))
  model = llm_jax.load(tmp_path / "run")
  assert model.config.model == dataclasses.replace(CONFIG.model, scan_layers=False)  # inference layout
  assert_trees_equal(transformer.stack_layers(model.params), saved.params)
  out = checkpoint.export_params(tmp_path / "run", tmp_path / "export", dtype="bfloat16")
  exported = llm_jax.load(out)
  assert exported.config.model.param_dtype == "bfloat16"
  leaf = exported.params["layers"]["1"]["mlp"]["up_proj"]["kernel"]
  assert leaf.dtype == jax.numpy.bfloat16
  np.testing.assert_array_equal(np.asarray(leaf, np.float32),
                                np.asarray(saved.params["layers"]["mlp"]["up_proj"]["kernel"][1].astype("bfloat16"), np.float32))
  tokens = np.arange(8)[None] % CONFIG.model.vocab_size
  np.testing.assert_allclose(model.logits(tokens), np.asarray(transformer.forward(saved.params, CONFIG.model, tokens)),
                             atol=1e-5)
  with pytest.raises(checkpoint.CheckpointError, match="already exists"):
    checkpoint.save_params(out, model.params, model.config)


def test_load_reports_missing_checkpoint(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    llm_jax.load(tmp_path / "nothing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint"):
    llm_jax.load(tmp_path / "empty")


def test_keeps_the_last_k_and_the_best_by_eval_loss(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
  for step, eval_loss in zip(range(1, 6), [5.0, 1.0, 4.0, None, 2.5]):
    ckpt.save(step, {"w": np.full((2,), float(step))}, {"step": np.int32(step)}, {"position": step},
              CONFIG, metrics=None if eval_loss is None else {"eval_loss": eval_loss})
  ckpt.wait()
  assert ckpt.all_steps() == [2, 4, 5]  # step 2 has the best eval loss; 4 and 5 are the latest
  ckpt.close()
