"""LoRA: adapters as a parameter transform on a frozen base, trained by the one step, on any mesh."""

import dataclasses
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_processes import run_processes  # tests/jax_processes.py
from test_train_loop import read_metrics, tiny_run_args, train
from test_train_step import make_config, synthetic_batch

import llm_jax
from llm_jax import config as config_lib
from llm_jax import sharding
from llm_jax.config import ConfigError, FinetuneConfig
from llm_jax.eval import runner
from llm_jax.model import lora, presets, transformer
from llm_jax.train import optim
from llm_jax.train import state as state_lib
from llm_jax.train import step as step_lib

ALL = FinetuneConfig(lora_rank=4, lora_alpha=8.0, lora_targets="q,k,v,o,gate,up,down,head")
LLAMA = dataclasses.replace(presets.get("tiny-llama"), tie_embeddings=False)


def forward(params, model, batch):
  return transformer.forward(params, model, batch["inputs"], segment_ids_BL=batch["segment_ids"],
                             positions_BL=batch["positions"])


@pytest.mark.parametrize("scanned", [True, False])
def test_fresh_adapters_give_exactly_the_base_logits_and_merging_changes_nothing(scanned):
  model = dataclasses.replace(LLAMA, scan_layers=scanned)
  base = transformer.init_params(model, jax.random.key(0))
  batch = synthetic_batch(2, 16, model.vocab_size, 0)
  adapters = lora.init(base, model, ALL, jax.random.key(1))
  np.testing.assert_array_equal(forward(lora.attach(base, adapters, ALL), model, batch), forward(base, model, batch))

  # Trained adapters (B no longer zero): the adapter path and merged weights agree, and differ from the base.
  trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), adapters)
  unmerged = forward(lora.attach(base, trained, ALL), model, batch)
  merged = forward(lora.merge(base, trained, ALL), model, batch)
  np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(unmerged) - np.asarray(forward(base, model, batch))).max() > 1e-2


def test_the_delta_is_alpha_over_rank_times_x_a_b():
  """Against a plain numpy computation for one projection (o_proj contracts two input dimensions)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)  # [B, L, H, K]
  a, b = rng.normal(size=(4, 5, 2)).astype(np.float32), rng.normal(size=(2, 6)).astype(np.float32)
  p = {"kernel": np.zeros((4, 5, 6), np.float32), "lora_a": a, "lora_b": b * 3.0}
  want = 3.0 * (x.reshape(2, 3, 20) @ a.reshape(20, 2)) @ b
  np.testing.assert_allclose(lora.delta(jnp.asarray(x), p, "blhk,hkd->bld", jnp.float32), want, rtol=1e-5)


def lora_run(finetune, steps=3, devices=None, mesh=config_lib.MeshConfig(data=1, fsdp=1, tensor=1)):
  config = config_lib.replace(make_config(mesh), model=LLAMA, finetune=finetune)
  mesh_ = sharding.make_mesh(config.mesh, devices)
  optimizer = optim.make_optimizer(config.optim, config.train.steps)
  shardings = state_lib.shardings(config.model, optimizer, mesh_, config.finetune)
  state = state_lib.create(config.model, optimizer, mesh_, 0, config.finetune)
  train_step, _ = step_lib.compile_steps(config, optimizer, optim.schedule(config.optim, 20), mesh_, shardings)
  frozen_before = jax.device_get(state.frozen)
  adapters_before = jax.device_get(state.params)
  losses = []
  for i in range(steps):
    batch = jax.device_put(synthetic_batch(8, 32, LLAMA.vocab_size, i), sharding.batch_sharding(mesh_))
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses, frozen_before, adapters_before


def test_only_adapters_train_and_only_they_hold_optimizer_state():
  finetune = dataclasses.replace(ALL, lora_dropout=0.1)
  state, losses, frozen_before, adapters_before = lora_run(finetune, devices=jax.devices()[:1])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), frozen_before)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(state.params), adapters_before)
  assert all(jax.tree.leaves(changed))
  assert losses[-1] < losses[0]
  adapter_shapes = sorted(x.shape for x in jax.tree.leaves(state.params))
  moment_shapes = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert moment_shapes == sorted(adapter_shapes * 2)  # AdamW's mu and nu, of adapters only
  base_bytes = sum(x.nbytes for x in jax.tree.leaves(state.frozen))
  assert sum(x.nbytes for x in jax.tree.leaves(state.opt_state)) < 0.2 * base_bytes


def test_lora_on_the_2x2x2_mesh_equals_one_device():
  single = lora_run(ALL, devices=jax.devices()[:1])[1]
  sharded = lora_run(ALL, mesh=config_lib.MeshConfig(data=2, fsdp=2, tensor=2))[1]
  np.testing.assert_allclose(sharded, single, rtol=1e-5)


def test_targets_the_architecture_lacks_are_one_line():
  gpt2 = presets.get("tiny-gpt2")
  with pytest.raises(ConfigError, match="'gate', but this model's MLP is 'gelu'"):
    lora.targets(dataclasses.replace(ALL, lora_targets="q,gate"), gpt2)
  with pytest.raises(ConfigError, match="'head', but this model ties its output head"):
    lora.targets(dataclasses.replace(ALL, lora_targets="head"), gpt2)
  with pytest.raises(ConfigError, match="has 'query'; choose from q, k, v"):
    lora.targets(dataclasses.replace(ALL, lora_targets="query"), gpt2)


LORA = ["finetune.lora_rank=4", "finetune.lora_targets=q,v,o,up,down", "train.log_every=1", "train.eval_every=2",
        "optim.schedule=constant"]


@pytest.fixture(scope="module")
def base(shared_data, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("base") / "run"
  result = train(tiny_run_args(shared_data, workdir, "train.steps=3", "train.eval_every=0"))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_lora_run_loads_exports_merged_and_equals_two_processes(shared_data, base, tmp_path):
  single = tmp_path / "single"
  result = train(tiny_run_args(shared_data, single, *LORA, "train.steps=4", f"train.init_from={base}",
                               "mesh.cpu_devices=1"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "training LoRA adapters (q,v,o,up,down, rank 4)" in result.stdout
  saved = config_lib.load_json(single / "config.json")
  assert saved.finetune.lora_rank == 4 and len(saved.finetune.base_checksum) == 64

  # llm_jax.load applies the adapters; an export with --merge-lora writes the same model as plain weights.
  tokens = [[5, 9, 17, 33, 60, 61]]
  lora_logits = llm_jax.load(single).logits(tokens)
  assert np.abs(lora_logits - llm_jax.load(base).logits(tokens)).max() > 1e-4
  export = tmp_path / "export"
  refused = subprocess.run([sys.executable, "-m", "llm_jax", "export", "--workdir", str(single), "--out", str(export)],
                           capture_output=True, text=True)
  assert refused.returncode == 2 and "pass --merge-lora" in refused.stderr and not export.exists()
  done = subprocess.run([sys.executable, "-m", "llm_jax", "export", "--workdir", str(single), "--out", str(export),
                         "--merge-lora"], capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]
  assert config_lib.load_json(export / "config.json").finetune.lora_rank == 0
  np.testing.assert_allclose(llm_jax.load(export).logits(tokens), lora_logits, rtol=1e-5, atol=1e-5)

  # `llm-jax eval` of the LoRA workdir evaluates it with its adapters: the merged export's figures, not the base's.
  evaluated = subprocess.run([sys.executable, "-m", "llm_jax", "eval", "--workdir", str(single), "--tasks",
                              "wikitext2", "--limit", "1"], capture_output=True, text=True)
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  figures = json.loads((single / "eval" / "wikitext2.json").read_text())["figures"]
  [merged], [plain] = (runner.run(path, ["wikitext2"], limit=1) for path in (export, base))
  assert figures["log_likelihood"] == pytest.approx(merged["figures"]["log_likelihood"], rel=1e-6)
  assert abs(figures["log_likelihood"] - plain["figures"]["log_likelihood"]) > 1.0

  # Two processes of 4 devices on the (2, 2, 2) mesh: the same losses.
  multi = tmp_path / "multi"
  args = tiny_run_args(shared_data, multi, *LORA, "train.steps=4", f"train.init_from={base}", "mesh.cpu_devices=4",
                       "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")[3:]
  run_processes(f"import sys\nfrom llm_jax import cli\nsys.exit(cli.main({args!r}))", num_processes=2,
                devices_per_process=4, timeout=400, env={"CI": "true"})
  expected, got = read_metrics(single), read_metrics(multi)
  for step in range(1, 5):
    assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5), step
  np.testing.assert_allclose(llm_jax.load(multi).logits(tokens), lora_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_adapters_on_another_base_are_refused(shared_data, base, tmp_path):
  own_base = tmp_path / "base"
  shutil.copytree(base, own_base)  # a copy of the module's 3-step base, to train on below
  run = tmp_path / "lora"
  assert train(tiny_run_args(shared_data, run, *LORA, "train.steps=2", f"train.init_from={own_base}")).returncode == 0
  # The base is trained on: its newest checkpoint changes, so the adapters no longer belong to it.
  assert train(tiny_run_args(shared_data, own_base, "train.steps=4", "train.eval_every=0")).returncode == 0
  generate = subprocess.run([sys.executable, "-m", "llm_jax", "generate", "--workdir", str(run), "--prompt", "A"],
                            capture_output=True, text=True)
  assert generate.returncode == 2 and len(generate.stderr.strip().splitlines()) == 1
  assert "were trained on another base" in generate.stderr
  resumed = train(tiny_run_args(shared_data, run, *LORA, "train.steps=3", f"train.init_from={own_base}"))
  assert resumed.returncode == 2 and "trained LoRA adapters on another base" in resumed.stderr
  assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
