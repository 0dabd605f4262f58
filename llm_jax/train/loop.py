"""The trainer: set up or resume, run the step loop, evaluate, checkpoint, log. The only hub.

The loop never waits for the device on its own account: step N+1 is dispatched before the
metrics of step N are fetched, and only steps that are logged are fetched at all. SIGTERM
or SIGINT finishes the current step, saves a checkpoint and exits cleanly; a second SIGINT
aborts at once.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import shutil
import signal
import time
from typing import Any

import jax
import numpy as np

from llm_jax import checkpoint, distributed, sampling, sharding
from llm_jax import config as config_lib
from llm_jax.data import pipeline
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.model import stats
from llm_jax.train import metrics as metrics_lib
from llm_jax.train import optim
from llm_jax.train import state as state_lib
from llm_jax.train import step as step_lib

RUN_FILES = ("checkpoints", "config.json", "metrics.jsonl", "tensorboard", "tokenizer.model", "tokenizer.json")


class WorkdirError(config_lib.ConfigError):
  """A workdir that belongs to another run."""


@dataclasses.dataclass
class _Stop:
  """Set by SIGTERM/SIGINT: finish the step, save, exit 0."""
  requested: bool = False

  def install(self) -> dict:
    previous = {}

    def handler(signum, frame):
      if self.requested and signum == signal.SIGINT:
        raise KeyboardInterrupt  # second Ctrl-C: abort now
      self.requested = True
      print(f"llm-jax: {signal.Signals(signum).name} received; finishing this step and saving a checkpoint",
            flush=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
      previous[sig] = signal.signal(sig, handler)
    return previous


def prepare_workdir(config: config_lib.Config, workdir: pathlib.Path, fresh: bool) -> None:
  """Refuses a workdir of another architecture unless --fresh, which clears the old run."""
  if fresh and jax.process_index() == 0:
    for name in RUN_FILES:
      path = workdir / name
      if path.is_dir():
        shutil.rmtree(path)
      elif path.exists():
        path.unlink()
  saved = workdir / "config.json"
  if saved.is_file() and not fresh:
    old = config_lib.load_json(saved).model
    field = checkpoint.first_difference(old, config.model)
    if field:
      raise WorkdirError(f"{workdir} holds a run with model.{field}={getattr(old, field)!r}, this config has "
                         f"{getattr(config.model, field)!r}; use another --workdir or pass --fresh to start it over")
  workdir.mkdir(parents=True, exist_ok=True)


def _tokenizer(config: config_lib.Config, workdir: pathlib.Path, resuming: bool):
  """The run's tokenizer: the workdir's own copy when resuming, so a run never switches vocab."""
  if resuming and ((workdir / "tokenizer.model").is_file() or (workdir / "tokenizer.json").is_file()):
    tok = tokenizer_lib.load_from_workdir(workdir)
  else:
    tok = tokenizer_lib.load_tokenizer(config.data.tokenizer)
  tokenizer_lib.check_vocab(tok, config.model.vocab_size)
  return tok


def evaluate(eval_step, params, config: config_lib.Config, tokenizer, mesh) -> dict[str, float]:
  """Loss over `train.eval_batches` batches of the validation split, the same batches every time."""
  totals = None
  with pipeline.make_batches(config.data, tokenizer, batch_size=config.train.batch_size, seed=config.train.seed,
                             mesh=mesh, split="eval") as batches:
    for _, batch in zip(range(config.train.eval_batches), batches):
      sums = eval_step(params, batch)
      totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  totals = jax.device_get(totals)
  loss = float(totals["ce_sum"] / max(totals["tokens"], 1.0))
  return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def train(config: config_lib.Config, workdir: str | pathlib.Path, fresh: bool = False) -> dict[str, Any]:
  """Runs (or resumes) the run described by `config` in `workdir`; returns the last record."""
  distributed.initialize(config.mesh)
  config_lib.validate(config, jax.device_count())
  workdir = pathlib.Path(workdir).absolute()
  prepare_workdir(config, workdir, fresh)
  mesh = sharding.make_mesh(config.mesh)
  # Before the data pipeline's threads start: on CPU the peak is measured, and they would share the cores.
  peak, peak_source = metrics_lib.peak_flops()
  total = config.train.steps
  optimizer = optim.make_optimizer(config.optim, total)
  lr_schedule = optim.schedule(config.optim, total)
  shardings = state_lib.shardings(config.model, optimizer, mesh)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  start = ckpt.latest_step()
  tokenizer = _tokenizer(config, workdir, resuming=start is not None)
  batches = pipeline.make_batches(config.data, tokenizer, batch_size=config.train.batch_size,
                                  seed=config.train.seed, mesh=mesh, split="train")
  if start is not None:
    state, data_state = _restore(ckpt, start, config, optimizer, mesh)
    batches.set_state(data_state)
    _say(f"llm-jax: resuming from step {start} in {ckpt.directory}")
  else:
    state = state_lib.create(config.model, optimizer, mesh, config.train.seed)
    if config.train.init_from:
      params, _ = checkpoint.restore_params(config.train.init_from, config.model, shardings.params)
      state = state._replace(params=params)
      _say(f"llm-jax: starting from the parameters of {config.train.init_from}")
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config_lib.to_json(config))
    tokenizer.save(workdir)

  train_step, eval_step = step_lib.compile_steps(config, optimizer, lr_schedule, mesh, shardings)
  tokens_per_step = config.train.batch_size * config.data.seq_len
  flops_per_token = stats.flops_per_token(config.model, config.data.seq_len)
  reporter = metrics_lib.Reporter(workdir, total, start or 0)
  reporter.message(f"llm-jax: {stats.count_params(config.model)['params']:,} parameters, mesh {dict(mesh.shape)}, "
                   f"MFU against {peak_source} ({peak / 1e9:,.0f} GFLOP/s)")
  stop = _Stop()
  previous_handlers = stop.install()
  last: dict[str, Any] = {}
  best_eval, evals_without_gain = float("inf"), 0
  pending = None  # (step, metrics on device) of the last dispatched step that will be logged
  clock = (time.perf_counter(), start or 0)
  stopping = False
  try:
    for step in range((start or 0) + 1, total + 1):
      batch = next(batches)
      with jax.transfer_guard("disallow"):
        state, step_metrics = train_step(state, batch)
      if pending is not None:  # fetch step N-1's metrics only now that step N is queued
        record, clock = _measure(*pending, clock, tokens_per_step, flops_per_token, peak)
        reporter.write(record)
        last, pending = record, None
      stopping = stop.requested  # read once: a signal arriving later is handled after the next step
      is_last = step == total or stopping
      eval_now = bool(config.train.eval_every) and (step % config.train.eval_every == 0 or is_last)
      record_eval = {}
      if eval_now:
        record, _ = _measure(step, step_metrics, clock, tokens_per_step, flops_per_token, peak)
        record_eval = evaluate(eval_step, state.params, config, tokenizer, mesh)
        last = {**record, **record_eval}
        reporter.write(last)
        _print_sample(reporter, state.params, config, tokenizer)
        clock = (time.perf_counter(), step)  # evaluation time is not training throughput
        if record_eval["eval_loss"] < best_eval:
          best_eval, evals_without_gain = record_eval["eval_loss"], 0
        else:
          evals_without_gain += 1
      elif step % config.train.log_every == 0 or is_last:
        pending = (step, step_metrics)
      early_stop = bool(config.train.early_stop_patience) and evals_without_gain >= config.train.early_stop_patience
      if (config.train.checkpoint_every and step % config.train.checkpoint_every == 0) or is_last or early_stop:
        ckpt.save(step, state.params, _train_item(state), batches.get_state(), config,
                  metrics={"eval_loss": record_eval["eval_loss"]} if record_eval else None)
      if early_stop:
        reporter.message(f"llm-jax: stopping early at step {step}: eval loss has not improved for "
                         f"{evals_without_gain} evaluations (best {best_eval:.4f})")
        break
      if stopping:
        break
    if pending is not None:
      last, clock = _measure(*pending, clock, tokens_per_step, flops_per_token, peak)
      reporter.write(last)
    ckpt.wait()
    if stopping:
      reporter.message(f"llm-jax: stopped at step {int(jax.device_get(state.step))}; checkpoint saved in "
                       f"{ckpt.directory}. Run the same command to resume.")
    elif not config.train.eval_every:
      _print_sample(reporter, state.params, config, tokenizer)
  finally:
    for sig, handler in previous_handlers.items():
      signal.signal(sig, handler)
    ckpt.close()
    reporter.close()
    batches.close()
  return last


def _train_item(state: state_lib.TrainState) -> dict[str, Any]:
  return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}


def _restore(ckpt: checkpoint.Checkpointer, step: int, config: config_lib.Config, optimizer, mesh):
  def targets(model):
    target = state_lib.abstract(model, optimizer, mesh)
    return target.params, _train_item(target)

  params, train_item, data_state = ckpt.restore(step, targets, config.model)
  state = state_lib.TrainState(train_item["step"], params, train_item["opt_state"], train_item["rng"])
  return state, data_state


def _measure(step: int, device_metrics: dict, clock: tuple[float, int], tokens_per_step: int,
             flops_per_token: float, peak: float) -> tuple[dict, tuple[float, int]]:
  """One step's record; fetching its metrics blocks only until that (already queued) step is done."""
  host = jax.device_get(device_metrics)
  now = time.perf_counter()
  since, last_step = clock
  steps = max(step - last_step, 1)
  step_time = (now - since) / steps
  tokens_per_sec = tokens_per_step / step_time
  record = {
      "step": step, "loss": float(host["loss"]), "learning_rate": float(host["learning_rate"]),
      "grad_norm": float(host["grad_norm"]), "tokens_per_sec": tokens_per_sec, "step_time_s": step_time,
      "mfu": flops_per_token * tokens_per_sec / peak,
  }
  return record, (now, step)


def _print_sample(reporter, params, config: config_lib.Config, tokenizer) -> None:
  """One generated sample at each evaluation, so a run shows what its model writes.

  The sample is cut to fit the model's context: a short-context model still trains.
  """
  s = config.sample
  room = config.model.max_len - max(len(tokenizer.encode(s.prompt)), 1)
  if room <= 0:
    return
  text = sampling.generate_text(params, config.model, tokenizer, [s.prompt], max_new_tokens=min(s.max_new_tokens, room),
                                temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed)[0]
  reporter.message(f"--- sample ---\n{s.prompt}{text}\n--------------")


def _say(text: str) -> None:
  if jax.process_index() == 0:
    print(text, flush=True)

