"""Memory planning: `llm-jax inspect`'s per-device estimate against what XLA compiles for the step."""

import json
import pathlib
import subprocess
import sys

import jax
import pytest

from llm_jax import config as config_lib
from llm_jax.model import presets
from llm_jax.train import memory

MESH = config_lib.MeshConfig(data=2, fsdp=2, tensor=2)


@pytest.mark.parametrize("preset,batch,seq_len,loss_chunk", [("gpt-10m", 8, 256, 0), ("tiny-llama", 16, 64, 0),
                                                              ("tiny-llama", 16, 64, 16)])
def test_estimate_is_within_a_quarter_of_the_compiled_step(preset, batch, seq_len, loss_chunk, capfd):
  """... and XLA partitions the step without replicating an activation it was asked to shard (its
  "Involuntary full rematerialization" warning, which gpt-10m's learned positions once caused)."""
  config = config_lib.Config(model=presets.get(preset), mesh=MESH, data=config_lib.DataConfig(seq_len=seq_len),
                             train=config_lib.TrainConfig(batch_size=batch, loss_chunk=loss_chunk))
  planned = memory.plan(config)
  parts = ("parameters", "optimizer_state", "gradients", "activations", "gathered_weights")
  assert planned["total"] == sum(planned[k] for k in parts)
  assert planned["optimizer_state"] > 1.9 * planned["parameters"]  # AdamW: two moments
  compiled = memory.compiled_bytes(config)
  assert 0.75 < planned["total"] / compiled < 1.25, (planned, compiled)
  assert "Involuntary full rematerialization" not in capfd.readouterr().err


def test_fit_lines_follow_the_mesh():
  one = config_lib.Config(model=presets.get("llama3-8b"), mesh=config_lib.MeshConfig(data=1, fsdp=1, tensor=1),
                          data=config_lib.DataConfig(seq_len=2048), train=config_lib.TrainConfig(batch_size=1))
  alone = memory.plan(config_lib.override(one, {"model.dtype": "bfloat16", "model.remat": "full"}))
  # 8B parameters x 16 bytes (float32 parameters, two moments, gradients) = 119 GiB
  assert 119 * memory.GIB < alone["total"] < 0.9 * 141 * memory.GIB
  assert alone["fits"]["H100"].startswith("does not fit on H100 (80 GiB): ")
  assert alone["fits"]["H200"].startswith("fits on H200 (141 GiB): ")
  spread = memory.plan(config_lib.override(one, {"model.dtype": "bfloat16", "model.remat": "full", "mesh.fsdp": 64,
                                                 "train.batch_size": 64}))
  assert spread["fits"]["H100"].startswith("fits on H100 (80 GiB): ")
  assert spread["parameters"] * 60 < alone["parameters"]


def test_inspect_prints_the_plan():
  out = subprocess.run([sys.executable, "-m", "llm_jax", "inspect", "--preset", "gpt2-124m", "mesh.fsdp=8",
                        "train.batch_size=64", "data.seq_len=1024", "model.dtype=bfloat16"],
                       capture_output=True, text=True, check=True).stdout
  plan = json.loads(out)["memory"]
  assert plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and plan["rows_per_device"] == 8
  assert set(plan["fits"]) == {"H100", "H200", "A100", "TPU v4", "TPU v5e", "TPU v5p", "TPU v6e"}


def test_best_remat_recomputes_least_that_fits():
  config = config_lib.Config(model=presets.get("gpt-10m"), mesh=config_lib.MeshConfig(data=1, fsdp=1, tensor=1),
                             data=config_lib.DataConfig(seq_len=256), train=config_lib.TrainConfig(batch_size=8))
  totals = {p: memory.plan(config_lib.override(config, {"model.remat": p}))["total"] for p in memory.REMAT_ORDER}
  assert totals["none"] > totals["save_matmuls"] > totals["full"]
  assert memory.best_remat(config, totals["none"] * 2) == "none"
  assert memory.best_remat(config, int(totals["save_matmuls"] / memory.HEADROOM) + 1) == "save_matmuls"
  assert memory.best_remat(config, totals["full"]) == "full"  # nothing fits: the least memory


def test_main_jobs_step_keeps_its_temporaries_under_glibcs_mmap_ceiling():
  """configs/tiny_shakespeare.py scans its layers and recomputes them so that, on one CPU device, XLA's
  temporaries for a step stay under the 32 MiB above which glibc maps them afresh every step (its
  comment says why); unrolled without remat they take twice that."""
  config = config_lib.load_file(pathlib.Path(__file__).resolve().parents[1] / "configs/tiny_shakespeare.py")
  ceiling = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit hosts
  assert memory.compiled_memory(config, jax.devices()[:1]).temp_size_in_bytes < ceiling
  unrolled = config_lib.override(config, {"model.scan_layers": False, "model.remat": "none"})
  assert memory.compiled_memory(unrolled, jax.devices()[:1]).temp_size_in_bytes > ceiling
