"""The Python pieces of scripts/device_check.sh, run on CPU with tiny sizes (the GPU runs them full size)."""

import math
import sys

import pytest
from test_train_loop import REPO

from llm_jax import host_memory
from llm_jax.model import presets, stats

sys.path.insert(0, str(REPO / "scripts"))
import attention_check  # noqa: E402  scripts/attention_check.py
import bench_train  # noqa: E402  scripts/bench_train.py
import bench_xla_options  # noqa: E402  scripts/bench_xla_options.py


def test_attention_check_compares_a_kernel_with_xla_in_float32():
  result = attention_check.check("einsum", seq_len=64, heads=4, kv_heads=2, head_dim=16, repeats=1)
  assert result["ok"] and 0 < result["max_error"] < attention_check.TOLERANCE  # bfloat16 against float32
  assert set(result["window_8"]) == {"out", "grad_q", "grad_k", "grad_v", "seconds", "xla_bf16_seconds"}


def test_bench_train_reports_the_plan_and_the_kernel():
  result = bench_train.measure_step("tiny-llama", batch_size=8, seq_len=64, steps=2,
                                    overrides=["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], remat="full")
  assert result["attention"] == "einsum" and result["remat"] == "full" and result["cpu"]
  assert result["planned_bytes_per_device"] > 0 and result["tokens_per_sec"] > 0
  assert isinstance(result["page_faults_per_step"], int) and isinstance(result["kernel_s_per_step"], float)
  trial = result["huge_pages"]  # the trainer's trial runs where malloc asks for huge pages
  if host_memory.asked_for():
    assert trial["kept"] in (True, False) and len(trial["with_s"]) == len(trial["without_s"]) == 3
  else:
    assert trial == {"kept": None, "with_s": [], "without_s": []}


def test_torch_peer_trains_the_same_architecture():
  """The peer of --compare-torch has our parameter count in both families, and its process reports a
  step and a loss."""
  import torch_reference  # scripts/torch_reference.py; imports torch

  for preset in ("tiny-gpt2", "tiny-llama"):
    model = presets.get(preset)
    assert sum(p.numel() for p in torch_reference.GPT(model).parameters()) == stats.count_params(model)["params"]
  peer = bench_train.TorchPeer(model, batch_size=2, seq_len=16, steps=1)
  peer()
  figures = peer.figures(stats.flops_per_token(model, 16), [0.5])
  assert figures["torch_step_time_s"] > 0 and figures["speedup_vs_torch"] == round(figures["torch_step_time_s"] / 0.5, 2)
  assert abs(figures["torch_loss"] - math.log(model.vocab_size)) < 0.5  # near uniform after one step from init


def test_xla_options_are_compiled_per_variant_and_timed_in_turns():
  """An option XLA takes runs beside the default and a control; one it lacks is one line naming it."""
  assert bench_xla_options.parse_option("xla_cpu_use_onednn=true") == ("xla_cpu_use_onednn", True)
  assert bench_xla_options.parse_option("xla_cpu_matmul_tiling_m_dim=8") == ("xla_cpu_matmul_tiling_m_dim", 8)
  assert bench_xla_options.parse_option("xla_cpu_experimental_ynn_fusion_type=dot,eltwise")[1] == "dot,eltwise"
  with pytest.raises(SystemExit, match="expected xla_NAME=VALUE"):
    bench_xla_options.parse_option("use_onednn")
  config = bench_train.bench_config("tiny-llama", batch_size=8, seq_len=32)
  option = {"xla_cpu_enable_concurrency_optimized_scheduler": False}
  result = bench_xla_options.compare(config, [option], steps=1, rounds=2)
  [variant] = result["variants"]
  assert variant["options"] == option and variant["same_loss"] and len(variant["ratio_per_round"]) == 2
  assert result["default_step_s"] > 0 and result["control_ratio"] > 0 and result["cpu"]
  with pytest.raises(SystemExit, match=r"--option \{'xla_no_such_option': True\}: XLA refused it \(.*No such"):
    bench_xla_options.compare(config, [{"xla_no_such_option": True}], steps=1, rounds=1)
