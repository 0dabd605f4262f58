"""Train-step throughput on random tokens; prints one JSON line.

  python scripts/bench_train.py --preset gpt-10m --compare-torch mesh.cpu_devices=2 mesh.data=2 mesh.fsdp=1  # CPU
  python scripts/bench_train.py --config configs/tiny_shakespeare.py --compare-torch  # the main job's model
  python scripts/bench_train.py --preset gpt2-124m --dtype bfloat16 --batch-size 32 --seq-len 1024  # GPU

gpt-10m is fixed: 6 layers, 6 heads, d_model 384, d_ff 1536, seq_len 256, vocab 8192, global
batch 8, AdamW, float32. MFU uses the FLOP convention of llm_jax.model.stats against the peak
of llm_jax.train.metrics (on CPU, a float32 matmul rate measured in this same run). Imports
nothing from the data pipeline, so it runs where grain and TFDS are not installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

from llm_jax import config as config_lib
from llm_jax import distributed, host_memory, sharding
from llm_jax.model import presets, stats, transformer
from llm_jax.train import memory, metrics, optim
from llm_jax.train import state as state_lib
from llm_jax.train import step as step_lib

DEFAULTS = {"gpt-10m": dict(batch_size=8, seq_len=256)}


def random_batch(rng: np.random.Generator, batch: int, seq_len: int, vocab: int) -> dict[str, np.ndarray]:
  tokens = rng.integers(0, vocab, (batch, seq_len + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((batch, seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
          "loss_mask": np.ones((batch, seq_len), np.float32)}


def bench_config(preset: str = "gpt-10m", batch_size: int | None = None, seq_len: int | None = None,
                 dtype: str = "float32", overrides: list[str] = (), config_path: str = "") -> config_lib.Config:
  """The benchmarked config: a preset's model, or a config file's model, mesh, optimizer, batch and length.

  The step count only shapes the learning-rate schedule; it is fixed so figures compare.
  """
  if config_path:
    config = config_lib.load_file(config_path)
    batch_size, seq_len = batch_size or config.train.batch_size, seq_len or config.data.seq_len
  else:
    defaults = DEFAULTS.get(preset, dict(batch_size=8, seq_len=1024))
    batch_size, seq_len = batch_size or defaults["batch_size"], seq_len or defaults["seq_len"]
    config = config_lib.Config(model=presets.get(preset))
  config = config_lib.override(config, {
      "data.seq_len": seq_len, "train.batch_size": batch_size, "train.steps": 1000, "model.dtype": dtype,
      "model.max_len": max(config.model.max_len, seq_len)})
  return config_lib.override(config, list(overrides))


def measure_step(preset: str = "gpt-10m", batch_size: int | None = None, seq_len: int | None = None,
                 steps: int = 25, dtype: str = "float32", overrides: list[str] = (), remat: str = "",
                 config_path: str = "", rounds: int = 1, between_rounds: Callable[[], None] | None = None) -> dict:
  """Compile time, median step time over `rounds` x `steps` steps after two warm-up steps, tokens/s, MFU.

  `remat` "best" takes the policy that recomputes least while the planned step fits the device
  (`memory.best_remat`, from the device's memory limit); "" keeps the config's.
  """
  config = bench_config(preset, batch_size, seq_len, dtype, overrides, config_path)
  batch_size, seq_len = config.train.batch_size, config.data.seq_len
  distributed.set_cpu_devices(config.mesh.cpu_devices)
  config_lib.validate(config, jax.device_count())
  device_stats = jax.devices()[0].memory_stats() or {}
  if remat == "best":
    if "bytes_limit" not in device_stats:
      raise SystemExit("--remat best needs the device's memory limit, which this backend does not report")
    remat = memory.best_remat(config, device_stats["bytes_limit"])
  if remat:
    config = config_lib.override(config, {"model.remat": remat})

  peak, peak_source = metrics.peak_flops()
  mesh = sharding.make_mesh(config.mesh)
  optimizer = optim.make_optimizer(config.optim, config.train.steps)
  schedule = optim.schedule(config.optim, config.train.steps)
  shardings = state_lib.shardings(config.model, optimizer, mesh)
  state = state_lib.create(config.model, optimizer, mesh, config.train.seed)
  train_step, _ = step_lib.compile_steps(config, optimizer, schedule, mesh, shardings)
  rng = np.random.default_rng(0)
  batches = [jax.device_put(random_batch(rng, batch_size, seq_len, config.model.vocab_size),
                            sharding.batch_sharding(mesh)) for _ in range(4)]

  compile_s, step_time, kernel, out, round_medians = time_steps(train_step, state, batches, steps, rounds,
                                                                between_rounds)
  tokens_per_sec = batch_size * seq_len / step_time
  peak_bytes = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  flops = stats.flops_per_token(config.model, seq_len)
  return {
      "preset": config_path or preset, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
      "devices": jax.device_count(), "dtype": dtype, "remat": config.model.remat, "batch_size": batch_size,
      "seq_len": seq_len, "params": stats.count_params(config.model)["params"],
      "tokens_per_sec": round(tokens_per_sec, 1), "step_time_s": round(step_time, 4),
      "round_step_times_s": [round(t, 4) for t in round_medians], "compile_s": round(compile_s, 2),
      "mfu": round(flops * tokens_per_sec / peak, 4), "peak_flops": peak, "peak_source": peak_source,
      "flops_per_token": flops, "loss": float(out["loss"]),
      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      **kernel, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      "attention": transformer.attention_implementation(config.model, seq_len),
      "planned_bytes_per_device": memory.plan(config)["total"], "peak_device_bytes": peak_bytes,
      "cpu": cpu_model(), "cpu_flags": cpu_flags(),
  }


VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> list[str]:
  """The processor's vector and matrix extensions that XLA's and torch's CPU kernels choose between."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
  except OSError:
    return []
  return [flag for flag in VECTOR_FLAGS if flag in flags]


def cpu_model() -> str:
  """The host processor's name (lscpu's "Model name"), which every benchmark line carries."""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return platform.processor() or "unknown"
  return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "unknown")


def time_steps(train_step, state, batches: list, steps: int, rounds: int = 1,
               between_rounds: Callable[[], None] | None = None) -> tuple[float, float, dict, dict, list[float]]:
  """(compile s, median step s, the kernel's share of a step, last metrics, each round's median step s).

  `rounds` rounds of `steps` timed steps follow two warm-up steps; `between_rounds` runs after
  each round (a peer's own round), so both sides see the machine's same minutes. The kernel's
  share (page faults and system seconds a step) is what glibc's tunables change
  (`llm_jax/host_memory.py`), and on a virtual machine it moves with the host from run to run; it
  comes with the huge-page trial's choice and times.
  """
  start = time.perf_counter()
  state, out = train_step(state, batches[0])
  jax.block_until_ready(out)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  state, out = train_step(state, batches[1])
  jax.block_until_ready(out)
  state, trial = try_huge_pages(train_step, state, batches, time.perf_counter() - start)
  times, round_medians, faults, kernel_s = [], [], 0, 0.0
  for _ in range(rounds):
    before = resource.getrusage(resource.RUSAGE_SELF)
    round_times = []
    for i in range(steps):
      start = time.perf_counter()
      state, out = train_step(state, batches[i % len(batches)])
      jax.block_until_ready(out)
      round_times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    faults += after.ru_minflt - before.ru_minflt
    kernel_s += after.ru_stime - before.ru_stime
    times += round_times
    round_medians.append(statistics.median(round_times))
    if between_rounds:
      between_rounds()
  kernel = {"page_faults_per_step": round(faults / len(times)), "kernel_s_per_step": round(kernel_s / len(times), 4),
            "huge_pages": {"kept": trial.kept, **{f"{'with' if on else 'without'}_s": [round(t, 4) for t in ts]
                                                  for on, ts in trial.times.items()}}}
  return compile_s, statistics.median(times), kernel, out, round_medians


def try_huge_pages(train_step, state, batches: list, step_s: float) -> tuple[object, host_memory.HugePageTrial]:
  """The trainer's huge-page trial (llm_jax/host_memory.py) on blocks of 3 s or more of steps (a run's
  logged intervals), before the timed rounds, so that the figures carry the setting a training run of
  this model would keep."""
  trial = host_memory.HugePageTrial(lambda text: print(text, file=sys.stderr), active=jax.default_backend() == "cpu",
                                    skip_first=False)
  block = max(2, math.ceil(3.0 / step_s))
  while trial.active:
    start = time.perf_counter()
    for i in range(block):  # each step waited for, as in the timed rounds
      state, out = train_step(state, batches[i % len(batches)])
      jax.block_until_ready(out)
    trial.observe((time.perf_counter() - start) / block)
  return state, trial


def main() -> None:
  host_memory.reexec_with_huge_pages()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="gpt-10m")
  parser.add_argument("--config", default="", help="a config file whose model, batch size and seq_len to time "
                      "(instead of --preset)")
  parser.add_argument("--batch-size", type=int)
  parser.add_argument("--seq-len", type=int)
  parser.add_argument("--steps", type=int, default=25, help="timed steps after two warm-up steps")
  parser.add_argument("--dtype", default="float32", help="compute dtype")
  parser.add_argument("--remat", default="", help="a model.remat policy, or best: the one that recomputes least "
                      "while the planned step fits the device")
  parser.add_argument("--compare-torch", action="store_true",
                      help="also time the same architecture in eager PyTorch (scripts/torch_reference.py), "
                      "its own process, one round after each of ours")
  parser.add_argument("--rounds", type=int, default=3, help="with --compare-torch: rounds of --steps steps, each "
                      "side's rounds alternated")
  parser.add_argument("overrides", nargs="*", metavar="section.key=value")
  args = parser.parse_args()
  peer = None
  if args.compare_torch:
    config = bench_config(args.preset, args.batch_size, args.seq_len, args.dtype, args.overrides, args.config)
    peer = TorchPeer(config.model, config.train.batch_size, config.data.seq_len, args.steps)
  result = measure_step(args.preset, args.batch_size, args.seq_len, args.steps, args.dtype, args.overrides, args.remat,
                        args.config, args.rounds if peer else 1, peer)
  if peer:
    result.update(peer.figures(result["flops_per_token"], result["round_step_times_s"]))
  print(json.dumps(result))


class TorchPeer:
  """The PyTorch peer, one process a round, with glibc's default malloc (torch's own setting)."""

  def __init__(self, model, batch_size: int, seq_len: int, steps: int):
    script = pathlib.Path(__file__).with_name("torch_reference.py")
    self.command = [sys.executable, str(script), "--model", json.dumps(dataclasses.asdict(model)),
                    "--batch-size", str(batch_size), "--seq-len", str(seq_len), "--steps", str(steps)]
    self.env = {k: v for k, v in os.environ.items() if not (k == "GLIBC_TUNABLES" and v == host_memory.TUNABLE)}
    self.tokens = batch_size * seq_len
    self.rounds: list[dict] = []

  def __call__(self) -> None:
    out = subprocess.run(self.command, env=self.env, capture_output=True, text=True, check=True).stdout
    self.rounds.append(json.loads(out.splitlines()[-1]))

  def figures(self, flops: float, our_round_times: list[float]) -> dict:
    """Its tokens/s and MFU (against torch's own matmul rate), and our speed over its, round by round."""
    times = [r["step_time_s"] for r in self.rounds]
    step = statistics.median(times)
    peak = statistics.median(r["matmul_flops"] for r in self.rounds)
    ratios = [theirs / ours for ours, theirs in zip(our_round_times, times, strict=True)]
    return {"torch_tokens_per_sec": round(self.tokens / step, 1), "torch_step_time_s": round(step, 4),
            "torch_round_step_times_s": [round(t, 4) for t in times], "torch_mfu": round(flops * self.tokens / step / peak, 4),
            "torch_peak_flops": peak, "torch_loss": self.rounds[-1]["loss"], "torch_threads": self.rounds[-1]["threads"],
            "speedup_vs_torch_rounds": [round(r, 3) for r in ratios], "speedup_vs_torch": round(statistics.median(ratios), 2)}


if __name__ == "__main__":
  main()
