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
import resource
import signal
import time
from typing import Any, Callable

import jax
import numpy as np

from llm_jax import checkpoint, distributed, errors, host_memory, sampling, sharding
from llm_jax import workdir as workdir_lib
from llm_jax import config as config_lib
from llm_jax.data import mixture, pipeline, templates
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.eval import loss as eval_loss
from llm_jax.model import lora as lora_lib
from llm_jax.model import stats, transformer
from llm_jax.train import metrics as metrics_lib
from llm_jax.train import optim
from llm_jax.train import profile as profile_lib
from llm_jax.train import state as state_lib
from llm_jax.train import step as step_lib

class _Stop:
  """SIGTERM/SIGINT: every process finishes the same step, they save one checkpoint together, exit 0.

  A signal may reach one process only, or the processes at different steps. Alone, a process
  stops after its current step; with several, they agree every `agree_every` steps through one
  small collective (any process asked to stop), so no step pays for a host sync of its own.
  """

  def __init__(self, agree_every: int = 1):
    self.requested = False
    self._agree_every = agree_every

  def install(self) -> dict:
    previous = {}

    def handler(signum, frame):
      if self.requested and signum == signal.SIGINT:
        errors.exit_interrupted()  # a second Ctrl-C: abort now
      self.requested = True
      print(f"llm-jax: {signal.Signals(signum).name} received; finishing this step and saving a checkpoint",
            flush=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
      previous[sig] = signal.signal(sig, handler)
    return previous

  def agreed(self, step: int) -> bool:
    """Whether every process stops after `step`; all processes get the same answer."""
    if jax.process_count() == 1:
      return self.requested
    if step % self._agree_every:
      return False
    from jax.experimental import multihost_utils
    return bool(multihost_utils.process_allgather(np.int32(self.requested)).max())


def prepare_workdir(config: config_lib.Config, workdir: pathlib.Path, fresh: bool) -> None:
  """Refuses a workdir of another architecture unless --fresh, which clears everything a run wrote."""
  if fresh and jax.process_index() == 0:
    workdir_lib.clear_run(workdir)
  saved = workdir / "config.json"
  if saved.is_file() and not fresh:
    old = config_lib.load_json(saved).model
    field = checkpoint.first_difference(old, config.model)
    if field:
      raise workdir_lib.WorkdirError(f"{workdir} holds a run with model.{field}={getattr(old, field)!r}, this config "
                                     f"has {getattr(config.model, field)!r}; use another --workdir or pass --fresh "
                                     "to start it over")
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_count() > 1:  # no process reads the folder while process 0 may still be clearing it
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("llm-jax: workdir prepared")


def _tokenizer(config: config_lib.Config, workdir: pathlib.Path, resuming: bool):
  """The run's tokenizer: the workdir's own copy when resuming, so a run never switches vocab."""
  if resuming and ((workdir / "tokenizer.model").is_file() or (workdir / "tokenizer.json").is_file()):
    tok = tokenizer_lib.load_from_workdir(workdir)
  else:
    tok = tokenizer_lib.load_tokenizer(config.data.tokenizer)
  tokenizer_lib.check_vocab(tok, config.model.vocab_size)
  return tok


def evaluate(eval_step: Callable, params: Any, frozen: Any, config: config_lib.Config,
             tokenizer: tokenizer_lib.Tokenizer, mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Loss over `train.eval_batches` batches of the validation split, the same batches every time;
  and `eval_accuracy` when the loss counts `correct` (classification). A data.mixture (without
  data.eval_source) is evaluated per source: `eval_loss/NAME` each, and `eval_loss` their mean by weight."""
  data = config.data
  if data.mixture and not data.eval_source:
    per_source = {name: evaluate(eval_step, params, frozen, config_lib.replace(config, data=dict(source=source, mixture=())),
                                 tokenizer, mesh)["eval_loss"]
                  for name, (source, _) in zip(mixture.labels(data.mixture), data.mixture)}
    weights = [weight for _, weight in data.mixture]
    loss = float(np.average(list(per_source.values()), weights=weights))
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
            **{f"eval_loss/{name}": value for name, value in per_source.items()}}
  with pipeline.make_batches(data, tokenizer, batch_size=config.train.batch_size, seed=config.train.seed,
                             mesh=mesh, split="eval", num_classes=config.model.num_classes) as batches:
    return eval_loss.summarize(eval_step, params, frozen, zip(range(config.train.eval_batches), batches), "eval")


def evaluate_test(eval_step: Callable, params: Any, frozen: Any, config: config_lib.Config,
                  tokenizer: tokenizer_lib.Tokenizer, mesh: jax.sharding.Mesh) -> dict[str, float]:
  """`test_loss`, `test_accuracy` and `test_examples` over the whole of data.test_source, each example once."""
  batches = pipeline.one_pass(config.data, tokenizer, batch_size=config.train.batch_size, mesh=mesh, split="test",
                              num_classes=config.model.num_classes)
  return eval_loss.summarize(eval_step, params, frozen, enumerate(batches), "test")


class RunStopped(config_lib.ConfigError):
  """A run that cannot go on as configured: diverged, or already past its target."""


def train(config: config_lib.Config, workdir: str | pathlib.Path, fresh: bool = False,
          profile: bool = False) -> dict[str, Any]:
  """Runs (or resumes) the run described by `config` in `workdir`; returns the last record.

  `profile` (--profile) traces a few steps after compilation when train.profile_steps is empty.
  """
  distributed.initialize(config.mesh)
  config = with_base(config)
  config_lib.validate(config, jax.device_count())
  transformer.attention_implementation(config.model, config.data.seq_len)  # a kernel that cannot run fails here
  workdir = pathlib.Path(workdir).absolute()
  workdir_lib.check_writable(workdir)
  with workdir_lib.lock(workdir, is_primary=jax.process_index() == 0):  # one trainer per workdir
    prepare_workdir(config, workdir, fresh)
    return _train(config, workdir, profile)


def _train(config: config_lib.Config, workdir: pathlib.Path, profile: bool = False) -> dict[str, Any]:
  """The run, inside its workdir's lock: set up or restore, then the step loop."""
  mesh = sharding.make_mesh(config.mesh)
  # Before the data pipeline's threads start: on CPU the peak is measured, and they would share the cores.
  peak, peak_source = metrics_lib.peak_flops()
  total = config.train.steps
  optimizer = optim.make_optimizer(config.optim, total)
  lr_schedule = optim.schedule(config.optim, total)
  shardings = state_lib.shardings(config.model, optimizer, mesh, config.finetune)
  stop = _Stop(agree_every=config.train.log_every)
  previous_handlers = stop.install()  # from here on a SIGTERM (restore, compile, ...) stops after a step and saves
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  batches = None
  try:
    start = ckpt.restorable_step()
    if start is not None:
      _check_resumable(ckpt.config(start), config, start, workdir)
    elif ckpt.removed_interrupted:
      _say(f"llm-jax: no complete checkpoint in {ckpt.directory}; the run starts from step 0")
    tokenizer = _tokenizer(config, workdir, resuming=start is not None)
    batches = pipeline.make_batches(config.data, tokenizer, batch_size=config.train.batch_size,
                                    seed=config.train.seed, mesh=mesh, split="train",
                                    num_classes=config.model.num_classes)
    loop_state = {"best_eval": None, "evals_without_gain": 0}
    lora = bool(config.finetune.lora_rank)
    if start is not None:
      state, data_state, loop_state = _restore(ckpt, start, config, optimizer, mesh)
      batches.set_state(data_state)
      _say(f"llm-jax: resuming from step {start} in {ckpt.directory}")
    else:
      state = state_lib.create(config.model, optimizer, mesh, config.train.seed, config.finetune)
    if config.train.init_from and (start is None or lora):  # a LoRA base is never checkpointed: load it again
      params = _restore_base(config, mesh, shardings.frozen if lora else shardings.params, state.params)
      state = state._replace(frozen=params) if lora else state._replace(params=params)
      if start is None:
        _say(f"llm-jax: starting from the parameters of {config.train.init_from}" +
             (f"; training LoRA adapters ({config.finetune.lora_targets}, rank {config.finetune.lora_rank})" if lora
              else ""))
    if jax.process_index() == 0:
      (workdir / "config.json").write_text(config_lib.to_json(config))
      tokenizer.save(workdir)
    train_step, eval_step = step_lib.compile_steps(config, optimizer, lr_schedule, mesh, shardings)
    reporter = metrics_lib.Reporter(workdir, total, start or 0, curves=config.train.curves)
    tracer = profile_lib.Tracer(profile_lib.window(config.train.profile_steps, profile, start or 0, total), workdir,
                                reporter.message)
    try:
      reporter.message(f"llm-jax: {stats.count_params(config.model)['params']:,} parameters, mesh "
                       f"{dict(mesh.shape)}, MFU against {peak_source} ({peak / 1e9:,.0f} GFLOP/s)")
      trial = host_memory.HugePageTrial(reporter.message, active=jax.default_backend() == "cpu")
      rate = _Rate(config.train.batch_size * config.data.seq_len, stats.flops_per_token(config.model, config.data.seq_len),
                   peak, start or 0, on_interval=trial.observe)
      return _run(config, state, start or 0, loop_state, train_step, eval_step, batches, tokenizer, mesh, ckpt,
                  reporter, rate, stop, tracer)
    finally:
      tracer.close()
      reporter.close()
  finally:
    for sig, handler in previous_handlers.items():
      signal.signal(sig, handler)
    ckpt.close()
    if batches is not None:
      batches.close()


def _restore_base(config: config_lib.Config, mesh, shardings: Any, fresh: Any) -> Any:
  """The parameters of train.init_from in this run's layout and shardings.

  A base of another `num_classes` (a pretrained LM, num_classes 0, under a new classifier) is
  restored as its own architecture; its classifier, if any, is dropped and this run's fresh one
  (from `fresh`) kept, so only the classifier starts from scratch.
  """
  base_classes = checkpoint.find_params(config.train.init_from)[1].model.num_classes
  model = config.model
  if base_classes == model.num_classes:
    return checkpoint.restore_params(config.train.init_from, model, shardings)[0]
  base_model = dataclasses.replace(model, num_classes=base_classes)
  base_shardings = sharding.param_shardings(mesh, transformer.logical_axes(base_model),
                                            transformer.abstract_params(base_model))
  params, _ = checkpoint.restore_params(config.train.init_from, base_model, base_shardings)
  params = {k: v for k, v in params.items() if k != "classifier"}
  if model.num_classes:
    params["classifier"] = fresh["classifier"]
    _say(f"llm-jax: a new classifier head of {model.num_classes} classes on the base's parameters")
  return params


def with_base(config: config_lib.Config) -> config_lib.Config:
  """With `train.init_from`, the base's architecture and tokenizer: one fine-tuning config serves any base.

  The config's model section then sets only run-time fields (checkpoint.RUNTIME_FIELDS: dtype,
  remat, dropout, ...), and data.tokenizer becomes the folder of the tokenizer saved beside the
  base (where none is, the config's own stands). A resume derives the same, so it compares equal.
  """
  if not config.train.init_from:
    return config
  params_dir, saved = checkpoint.find_params(config.train.init_from)
  # num_classes is the fine-tuning's own: a classifier may be put on a language model (the trainer inserts it).
  model = dataclasses.replace(saved.model, **{f: getattr(config.model, f) for f in checkpoint.RUNTIME_FIELDS},
                              num_classes=config.model.num_classes)
  folder = checkpoint.tokenizer_folder(params_dir.parent)
  config = config_lib.replace(config, model=model, data={"tokenizer": str(folder) if folder else config.data.tokenizer})
  if config.finetune.lora_rank:
    lora_lib.targets(config.finetune, model)  # a target the architecture lacks fails here, before compiling
    config = config_lib.replace(config, finetune={"base_checksum": checkpoint.base_checksum(config.train.init_from)})
  return config


def _check_resumable(saved: config_lib.Config, config: config_lib.Config, start: int, workdir: pathlib.Path) -> None:
  """Refuses, before anything is written, a resume that could not continue the saved run."""
  if start >= config.train.steps:
    raise RunStopped(f"{workdir} is already at step {start}, and train.steps={config.train.steps}: nothing to "
                     "train; raise train.steps to continue the run, or use another --workdir")
  if saved.finetune.base_checksum != config.finetune.base_checksum:
    raise RunStopped(f"{workdir} trained LoRA adapters on another base than the one now at train.init_from="
                     f"{config.train.init_from!r}; resume with that base, or use another --workdir")
  if saved.finetune.lora_rank and saved.model.scan_layers != config.model.scan_layers:
    raise RunStopped(f"{workdir} saved its LoRA adapters with model.scan_layers={saved.model.scan_layers}; resume "
                     "with the same value")
  if saved.data.tokenizer != config.data.tokenizer:
    raise RunStopped(f"{workdir} was trained with data.tokenizer={saved.data.tokenizer!r} but this run has "
                     f"data.tokenizer={config.data.tokenizer!r}; resume with the saved tokenizer or use another "
                     "--workdir")


def _run(config: config_lib.Config, state: state_lib.TrainState, start: int, loop_state: dict, train_step, eval_step,
         batches, tokenizer, mesh, ckpt: checkpoint.Checkpointer, reporter: metrics_lib.Reporter, rate: _Rate,
         stop: _Stop, tracer: profile_lib.Tracer) -> dict:
  """The step loop, from step `start` + 1 to `train.steps` (or a stop, early or asked for)."""
  total, train_cfg = config.train.steps, config.train
  last: dict[str, Any] = {}
  pending = None  # (step, metrics on device) of the last dispatched step that will be logged
  stopping = False
  for step in range(start + 1, total + 1):
    batch = next(batches)
    with jax.transfer_guard("disallow"), tracer.step(step, state):
      state, step_metrics = train_step(state, batch)
    tracer.after(step, state)
    if pending is not None:  # fetch step N-1's metrics only now that step N is queued
      last, pending = _log(rate.record(*pending), reporter, train_cfg), None
    stopping = stop.agreed(step)
    is_last = step == total or stopping
    eval_now = bool(train_cfg.eval_every) and (step % train_cfg.eval_every == 0 or is_last)
    record_eval = {}
    if eval_now:
      record = _log(rate.record(step, step_metrics), reporter, train_cfg, write=False)
      record_eval = evaluate(eval_step, state.params, state.frozen, config, tokenizer, mesh)
      last = {**record, **record_eval}
      reporter.write(last)
      _print_sample(reporter, state, config, tokenizer)
      rate.restart(step)  # evaluation time is not training throughput
      _track_best(loop_state, record_eval["eval_loss"])
    elif step % train_cfg.log_every == 0 or is_last:
      pending = (step, step_metrics)
    early_stop = bool(train_cfg.early_stop_patience) and loop_state["evals_without_gain"] >= train_cfg.early_stop_patience
    if (train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0) or is_last or early_stop:
      if record_eval and config.data.test_source:
        _track_best_checkpoint(loop_state, step, record_eval["eval_loss"])
      ckpt.save(step, state.params, _train_item(state), batches.get_state(), config,
                metrics={"eval_loss": record_eval["eval_loss"]} if record_eval else None, loop_state=loop_state)
    if early_stop:
      reporter.message(f"llm-jax: stopping early at step {step}: eval loss has not improved for "
                       f"{loop_state['evals_without_gain']} evaluations (best {loop_state['best_eval']:.4f})")
      break
    if stopping:
      break
  if pending is not None:
    last = _log(rate.record(*pending), reporter, train_cfg)
  ckpt.wait()
  if stopping:
    reporter.message(f"llm-jax: stopped at step {int(jax.device_get(state.step))}; checkpoint saved in "
                     f"{ckpt.directory}. Run the same command to resume.")
  elif not train_cfg.eval_every:
    _print_sample(reporter, state, config, tokenizer)
  if config.data.test_source and not stopping:
    last = _test(config, state, last, loop_state, eval_step, tokenizer, mesh, ckpt, reporter)
  return last


def _track_best_checkpoint(loop_state: dict, step: int, eval_loss: float) -> None:
  """The saved step of lowest eval loss: the one the Checkpointer keeps as the best, and the one tested."""
  best = loop_state.get("best_checkpoint")
  if best is None or eval_loss < best[1]:
    loop_state["best_checkpoint"] = [step, eval_loss]


def _test(config: config_lib.Config, state: state_lib.TrainState, last: dict, loop_state: dict, eval_step, tokenizer,
          mesh, ckpt: checkpoint.Checkpointer, reporter: metrics_lib.Reporter) -> dict[str, Any]:
  """Accuracy on the whole of data.test_source, once, of the checkpoint best by dev loss (the last
  state when no saved evaluation beat it). The last step's record is written again with the test
  figures added, so a reader keeping each step's last record has both; one line is printed."""
  step = int(jax.device_get(state.step))
  best = loop_state.get("best_checkpoint")
  params, chosen = state.params, step
  if best and best[0] != step and best[0] in ckpt.all_steps():
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          (state.params, _train_item(state)))
    params, chosen = ckpt.restore(best[0], lambda model: target, config.model)[0], best[0]
  record = {**evaluate_test(eval_step, params, state.frozen, config, tokenizer, mesh), "test_checkpoint_step": chosen}
  last = {**last, "step": step, **record}
  reporter.write(last)
  reporter.message(f"llm-jax: test accuracy {record['test_accuracy']:.4f} (loss {record['test_loss']:.4f}) on the "
                   f"{record['test_examples']} examples of {config.data.test_source}, with the parameters of step "
                   f"{chosen} (best dev eval_loss)")
  return last


def _track_best(loop_state: dict, eval_loss: float) -> None:
  """Early stopping's bookkeeping; kept in the checkpoint so a resumed run stops where this one would."""
  if loop_state["best_eval"] is None or eval_loss < loop_state["best_eval"]:
    loop_state["best_eval"], loop_state["evals_without_gain"] = eval_loss, 0
  else:
    loop_state["evals_without_gain"] += 1


def _log(record: dict, reporter: metrics_lib.Reporter, train_cfg: config_lib.TrainConfig, write: bool = True) -> dict:
  """Writes a fetched record, and stops a run whose updates keep being skipped (the step's guard)."""
  if write:
    reporter.write(record)
  if record["consecutive_skips"] >= train_cfg.max_skipped_steps:
    raise RunStopped(f"the last {record['consecutive_skips']} updates (to step {record['step']}) were skipped: the "
                     "loss or gradient was not finite" + (" or spiked" if train_cfg.spike_factor else "") +
                     "; the checkpoints are intact (no skipped update reaches them): lower optim.learning_rate "
                     "and rerun to resume from the last one")
  return record


def _train_item(state: state_lib.TrainState) -> dict[str, Any]:
  return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng, "guard": state.guard}


def _restore(ckpt: checkpoint.Checkpointer, step: int, config: config_lib.Config, optimizer, mesh):
  def targets(model):
    target = state_lib.abstract(model, optimizer, mesh, config.finetune)
    return target.params, _train_item(target)

  params, train_item, data_state, loop_state = ckpt.restore(step, targets, config.model)
  state = state_lib.TrainState(train_item["step"], params, train_item["opt_state"], train_item["rng"],
                               train_item["guard"])  # a LoRA base (frozen) is loaded by the caller
  return state, data_state, loop_state


class _Rate:
  """Turns a step's fetched metrics into its record: throughput over the steps since the last one, and
  the kernel's seconds a step (page faults, I/O), which glibc's huge-page tunable moves up or down
  depending on the host. Each interval's seconds a step also go to `on_interval`: the huge-page
  trial (llm_jax/host_memory.py) chooses from them."""

  def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float, step: int,
               on_interval: Callable[[float], None] = lambda step_time: None):
    self._tokens, self._flops, self._peak, self._on_interval = tokens_per_step, flops_per_token, peak, on_interval
    self.restart(step)

  def restart(self, step: int) -> None:
    self._since, self._step, self._kernel = time.perf_counter(), step, _kernel_seconds()

  def record(self, step: int, device_metrics: dict) -> dict[str, Any]:
    """Fetching the metrics blocks only until that (already queued) step is done."""
    host = jax.device_get(device_metrics)
    now, kernel = time.perf_counter(), _kernel_seconds()
    steps = max(step - self._step, 1)
    step_time, kernel_time = (now - self._since) / steps, (kernel - self._kernel) / steps
    self._since, self._step, self._kernel = now, step, kernel
    self._on_interval(step_time)
    tokens_per_sec = self._tokens / step_time
    return {
        "step": step, "loss": float(host["loss"]), "learning_rate": float(host["learning_rate"]),
        "grad_norm": float(host["grad_norm"]), "param_norm": float(host["param_norm"]),
        "tokens_per_sec": tokens_per_sec, "step_time_s": step_time, "mfu": self._flops * tokens_per_sec / self._peak,
        "kernel_s_per_step": kernel_time,
        "skipped_steps": int(host["skipped_steps"]), "consecutive_skips": int(host["consecutive_skips"]),
    }


def _kernel_seconds() -> float:
  """System CPU seconds of this process so far (all its threads)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def _print_sample(reporter, state: state_lib.TrainState, config: config_lib.Config, tokenizer) -> None:
  """One generated sample at each evaluation, so a run shows what its model writes.

  The sample is cut to fit the model's context: a short-context model still trains. A run on
  instructions (data.format alpaca or chat) gets `sample.prompt` through its template, as
  `llm-jax generate` does, so the sample shows the model answering it. A classifier prints none:
  its LM head is not what trains; nor does a run with sample.max_new_tokens=0.
  """
  if config.model.num_classes or not config.sample.max_new_tokens:
    return
  s = config.sample
  template = templates.from_config(config.data, tokenizer)
  prompt = s.prompt if template is None else templates.render_prompt(template, s.prompt)
  room = config.model.max_len - max(len(tokenizer.encode(prompt)), 1)
  if room <= 0:
    return
  params = lora_lib.merge(state.frozen, state.params, config.finetune) if state.frozen else state.params
  text = sampling.generate_text(params, config.model, tokenizer, [prompt], max_new_tokens=min(s.max_new_tokens, room),
                                temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed)[0]
  reporter.message(f"--- sample ---\n{prompt}{text}\n--------------")


def _say(text: str) -> None:
  if jax.process_index() == 0:
    print(text, flush=True)

