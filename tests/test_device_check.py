"""The Python pieces of scripts/device_check.sh, run on CPU with tiny sizes (the GPU runs them full size)."""

import sys

from test_train_loop import REPO

sys.path.insert(0, str(REPO / "scripts"))
import attention_check  # noqa: E402  scripts/attention_check.py
import bench_train  # noqa: E402  scripts/bench_train.py


def test_attention_check_compares_a_kernel_with_xla_in_float32():
  result = attention_check.check("einsum", seq_len=64, heads=4, kv_heads=2, head_dim=16, repeats=1)
  assert result["ok"] and 0 < result["max_error"] < attention_check.TOLERANCE  # bfloat16 against float32
  assert set(result["window_8"]) == {"out", "grad_q", "grad_k", "grad_v", "seconds", "xla_bf16_seconds"}


def test_bench_train_reports_the_plan_and_the_kernel():
  result = bench_train.measure_step("tiny-llama", batch_size=8, seq_len=64, steps=2,
                                    overrides=["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], remat="full")
  assert result["attention"] == "einsum" and result["remat"] == "full" and result["cpu"]
  assert result["planned_bytes_per_device"] > 0 and result["tokens_per_sec"] > 0
