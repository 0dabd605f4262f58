"""XLA compiler options against XLA's defaults on one train step, alternated in one process; prints one JSON line.

  python scripts/bench_xla_options.py --config configs/tiny_shakespeare.py \
      --option xla_cpu_enable_concurrency_optimized_scheduler=false
  python scripts/bench_xla_options.py --preset gpt-10m --option xla_cpu_use_onednn=true --rounds 6

Why one process: XLA_FLAGS hold for a whole process, and whole processes compared on a shared
2-core machine move by tens of percent from one minute to the next. `Lowered.compile` takes XLA's
debug options per compilation (`compiler_options`), so here the default step and each variant
are compiled from the same lowering and run in turns, `--steps` steps each, `--rounds` times:
every variant sees the machine's same minutes, and `ratio` (the median over rounds of variant /
default) is the figure to read. A second compilation of the default runs in turn too, as a control:
its ratio, `control_ratio`, is what the machine's noise alone gives, so a variant's ratio means
something only well outside it. A variant whose first step's loss differs from the default's is
marked `"same_loss": false`: an option that changes the numbers is not a speed setting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

import bench_train  # scripts/bench_train.py
from llm_jax import config as config_lib
from llm_jax import distributed, host_memory, sharding
from llm_jax.train import optim
from llm_jax.train import state as state_lib
from llm_jax.train import step as step_lib


def parse_option(text: str) -> tuple[str, bool | int | float | str]:
  """`name=value`, the value as XLA's option type: true/false, an integer, a number, or the text."""
  name, sep, value = text.partition("=")
  if not sep or not name.startswith("xla_"):
    raise SystemExit(f"--option {text!r}: expected xla_NAME=VALUE, e.g. xla_cpu_use_onednn=true")
  if value.lower() in ("true", "false"):
    return name, value.lower() == "true"
  for kind in (int, float):
    try:
      return name, kind(value)
    except ValueError:
      pass
  return name, value


def alternate(executables: list, state, batch, steps: int, rounds: int) -> list[list[float]]:
  """Each executable's median step time in every round; the executables take turns on one state."""
  for run in executables:  # warm-up: two steps each
    for _ in range(2):
      state, out = run(state, batch)
      jax.block_until_ready(out)
  medians = [[] for _ in executables]
  for _ in range(rounds):
    for run, times in zip(executables, medians):
      round_times = []
      for _ in range(steps):
        start = time.perf_counter()
        state, out = run(state, batch)
        jax.block_until_ready(out)
        round_times.append(time.perf_counter() - start)
      times.append(statistics.median(round_times))
  return medians


def compare(config: config_lib.Config, variants: list[dict], steps: int = 10, rounds: int = 10) -> dict:
  """The default step, its control and each variant (a dict of XLA options) timed in turns; the JSON line's fields."""
  distributed.set_cpu_devices(config.mesh.cpu_devices)
  mesh = sharding.make_mesh(config.mesh)
  optimizer = optim.make_optimizer(config.optim, config.train.steps)
  shardings = state_lib.shardings(config.model, optimizer, mesh)
  state = state_lib.create(config.model, optimizer, mesh, config.train.seed)
  train_step, _ = step_lib.compile_steps(config, optimizer, optim.schedule(config.optim, config.train.steps), mesh,
                                         shardings)
  batch = jax.device_put(bench_train.random_batch(np.random.default_rng(0), config.train.batch_size,
                                                  config.data.seq_len, config.model.vocab_size),
                         sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    lowered = train_step.jitted.lower(state, batch)
    executables = []
    for options in variants:  # first: an option XLA lacks fails before the other compilations
      try:
        executables.append(lowered.compile(compiler_options=options))
      except jax.errors.JaxRuntimeError as e:
        raise SystemExit(f"--option {options}: XLA refused it ({str(e).splitlines()[0]})") from None
    executables = [lowered.compile(), lowered.compile(), *executables]
    # Each from a copy of the same state, since every executable donates the state it is given.
    losses = [float(run(jax.tree.map(lambda x: x.copy(), state), batch)[1]["loss"]) for run in executables]
    medians = alternate(executables, state, batch, steps, rounds)
  default, control = medians[0], medians[1]

  def ratios(times: list[float]) -> list[float]:
    return [t / d for t, d in zip(times, default)]

  def rounded(values: list[float]) -> list[float]:
    return [round(v, 3) for v in values]

  return {
      "steps": steps, "rounds": rounds, "default_step_s": round(statistics.median(default), 5),
      "control_ratio": round(statistics.median(ratios(control)), 3), "control_ratio_per_round": rounded(ratios(control)),
      "variants": [{"options": options, "step_s": round(statistics.median(times), 5),
                    "ratio": round(statistics.median(ratios(times)), 3), "ratio_per_round": rounded(ratios(times)),
                    "same_loss": loss == losses[0]}
                   for options, times, loss in zip(variants, medians[2:], losses[2:])],
      "cpu": bench_train.cpu_model(), "cpu_flags": bench_train.cpu_flags(), "backend": jax.default_backend(),
  }


def main() -> None:
  host_memory.reexec_with_huge_pages()  # as `llm-jax` and bench_train.py run XLA
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="gpt-10m")
  parser.add_argument("--config", default="", help="a config file whose model, mesh, batch and length to time")
  parser.add_argument("--option", action="append", default=[], metavar="xla_NAME=VALUE",
                      help="one variant per --option (repeat it for more)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps in each turn")
  parser.add_argument("--rounds", type=int, default=10, help="turns of every variant")
  parser.add_argument("overrides", nargs="*", metavar="section.key=value")
  args = parser.parse_args()
  if not args.option:
    parser.error("name at least one --option xla_NAME=VALUE")
  config = bench_train.bench_config(args.preset, overrides=args.overrides, config_path=args.config)
  result = compare(config, [dict([parse_option(option)]) for option in args.option], args.steps, args.rounds)
  print(json.dumps({"model": args.config or args.preset, **result}))


if __name__ == "__main__":
  main()
