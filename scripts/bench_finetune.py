"""LoRA against full fine-tuning, same model and batch, in one run: step time and optimizer-state bytes.

  python scripts/bench_finetune.py [--preset gpt-10m] [--rank 8] [--targets q,k,v,o,up,down] [section.key=value ...]

Both train the same model on the same random batches with the same optimizer (AdamW); LoRA
starts from a random base, which is what its speed depends on. Prints one JSON line with each
mode's median step time, tokens/s, trainable parameters and optimizer-state bytes, the ratios
LoRA / full, and the CPU model.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from llm_jax import config as config_lib
from llm_jax import distributed, host_memory, sharding
from llm_jax.model import presets
from llm_jax.train import optim
from llm_jax.train import state as state_lib
from llm_jax.train import step as step_lib

from bench_train import DEFAULTS, cpu_model, random_batch, time_steps  # scripts/ is on sys.path when run as a script


def measure(config: config_lib.Config, steps: int) -> dict:
  mesh = sharding.make_mesh(config.mesh)
  optimizer = optim.make_optimizer(config.optim, config.train.steps)
  shardings = state_lib.shardings(config.model, optimizer, mesh, config.finetune)
  state = state_lib.create(config.model, optimizer, mesh, 0, config.finetune)
  train_step, _ = step_lib.compile_steps(config, optimizer, optim.schedule(config.optim, config.train.steps), mesh,
                                         shardings)
  rng = np.random.default_rng(0)
  B, L = config.train.batch_size, config.data.seq_len
  batches = [jax.device_put(random_batch(rng, B, L, config.model.vocab_size), sharding.batch_sharding(mesh))
             for _ in range(4)]
  trainable = sum(x.size for x in jax.tree.leaves(state.params))
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
  compile_s, step_time, _, out, _ = time_steps(train_step, state, batches, steps)
  return {"step_time_s": round(step_time, 4), "tokens_per_sec": round(B * L / step_time, 1),
          "compile_s": round(compile_s, 2), "trainable_params": int(trainable), "optimizer_state_bytes": int(opt_bytes),
          "loss": float(out["loss"])}


def main() -> None:
  host_memory.reexec_with_huge_pages()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="gpt-10m")
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--targets", default="q,k,v,o,up,down")
  parser.add_argument("--steps", type=int, default=15, help="timed steps after two warm-up steps")
  parser.add_argument("overrides", nargs="*", metavar="section.key=value")
  args = parser.parse_args()
  defaults = DEFAULTS.get(args.preset, dict(batch_size=8, seq_len=1024))
  config = config_lib.Config(model=presets.get(args.preset), data=config_lib.DataConfig(seq_len=defaults["seq_len"]),
                             train=config_lib.TrainConfig(batch_size=defaults["batch_size"], steps=1000))
  config = config_lib.override(config, list(args.overrides))
  distributed.set_cpu_devices(config.mesh.cpu_devices)
  full = measure(config, args.steps)
  lora = measure(config_lib.replace(config, finetune={"lora_rank": args.rank, "lora_targets": args.targets}),
                 args.steps)
  print(json.dumps({
      "preset": args.preset, "backend": jax.default_backend(), "cpu": cpu_model(), "devices": jax.device_count(),
      "batch_size": config.train.batch_size, "seq_len": config.data.seq_len, "lora_rank": args.rank,
      "lora_targets": args.targets, "full": full, "lora": lora,
      "step_time_ratio_lora_over_full": round(lora["step_time_s"] / full["step_time_s"], 3),
      "optimizer_bytes_ratio_lora_over_full": round(lora["optimizer_state_bytes"] / full["optimizer_state_bytes"], 5),
  }))


if __name__ == "__main__":
  main()
