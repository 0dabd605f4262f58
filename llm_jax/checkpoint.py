"""Where checkpoints are written and read (orbax). Knows pytrees, not the trainer.

A run's workdir holds `checkpoints/<step>/` with five items: `params` (the model's
parameters), `train` (step, optimizer state, RNG, the update guard's counters), `data` (the
data iterator's position for every row of the batch, JSON), `loop` (the trainer's own state
between steps, such as early stopping's best loss, JSON) and `config` (the resolved config,
JSON), plus `checksums.json`. Parameters sit apart from the optimizer state so inference and
fine-tuning read only what they need. A parameters-only checkpoint (from `llm-jax export` or
`llm-jax convert`) is a folder with `params/`, `config.json` and `checksums.json`.

Orbax writes each save into a temporary folder and renames it when complete, so a kill in
the middle of a save leaves the previous checkpoints untouched; the trainer deletes the
half-written folder. Every read first checks the files against their checksums (checksums.py):
a damaged checkpoint is reported and the one before it used. Restores take an abstract target
with shardings: a checkpoint restores onto any mesh and any number of processes. Scanned and
unscanned layer layouts convert on restore.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import pathlib
import shutil
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers
from orbax.checkpoint._src.metadata import array_metadata_store  # no public name; orbax's own handler uses it

from llm_jax import checksums
from llm_jax import config as config_lib
from llm_jax.data import hf_tokenizer
from llm_jax.errors import UserError
from llm_jax.model import quant, transformer

# Model fields that do not change the parameters' shapes or meaning: a run may change them.
RUNTIME_FIELDS = frozenset({"dtype", "scan_layers", "remat", "attention", "embed_dropout", "attn_dropout",
                            "resid_dropout", "init_std", "scaled_residual_init"})


# Orbax splits every replicated array among its replicas when saving (off by default on GPUs only),
# each part cut by an eager slice that costs about 1.2 ms of host time: on the tests' tiny models
# (a few hundred arrays on 2 CPU devices) that blocked each save for 1.0-1.2 s, against 0.2 s
# unsplit (AMD EPYC, 2 cores). A part of 1 MiB takes about as long to copy and write as its slice
# takes to dispatch, so only arrays whose parts are larger are split; a large model's are.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _split_only_large_replicated_arrays() -> None:
  handler = ocp.type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store(),
                                           min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # orbax warns that its own jax.Array handler is replaced, as asked here
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    absl_logger.setLevel(level)


_split_only_large_replicated_arrays()


class CheckpointError(UserError):
  """A checkpoint that is missing, incomplete or of another model."""


def architecture(model: config_lib.ModelConfig) -> dict[str, Any]:
  return {k: v for k, v in dataclasses.asdict(model).items() if k not in RUNTIME_FIELDS}


def first_difference(saved: config_lib.ModelConfig, wanted: config_lib.ModelConfig) -> str | None:
  """The first architecture field on which two models differ, or None."""
  old, new = architecture(saved), architecture(wanted)
  return next((k for k in new if old.get(k) != new[k]), None)


def check_same_architecture(saved: config_lib.ModelConfig, wanted: config_lib.ModelConfig, where: str) -> None:
  """Raises naming the first parameter whose shape differs (or the first differing field)."""
  saved_abstract = _in_layout(transformer.abstract_params(saved), wanted.scan_layers)
  wanted_abstract = transformer.abstract_params(wanted)
  saved_leaves = dict(_named_leaves(saved_abstract))
  for name, leaf in _named_leaves(wanted_abstract):
    if name not in saved_leaves:
      raise CheckpointError(f"{where} has no parameter {name} (shape {tuple(leaf.shape)}): it is another architecture")
    if saved_leaves[name].shape != leaf.shape:
      raise CheckpointError(f"{where}: parameter {name} has shape {tuple(saved_leaves[name].shape)} in the "
                            f"checkpoint but {tuple(leaf.shape)} in this model; it is another architecture")
  extra = sorted(set(saved_leaves) - {n for n, _ in _named_leaves(wanted_abstract)})
  if extra:
    raise CheckpointError(f"{where} has parameter {extra[0]} that this model lacks: it is another architecture")
  field = first_difference(saved, wanted)
  if field:
    raise CheckpointError(f"{where} was saved with model.{field}={getattr(saved, field)!r} but this run has "
                          f"model.{field}={getattr(wanted, field)!r}")


def _named_leaves(tree: Any) -> list[tuple[str, Any]]:
  return [(jax.tree_util.keystr(p, simple=True, separator="."), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def _in_layout(params: Any, scanned: bool) -> Any:
  """Converts a params tree (arrays or ShapeDtypeStructs) to the scanned or unscanned layout."""
  if transformer.is_scanned(params) == scanned:
    return params
  if jax.tree.leaves(params) and isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct):
    return jax.eval_shape(transformer.stack_layers if scanned else transformer.unstack_layers, params)
  return transformer.stack_layers(params) if scanned else transformer.unstack_layers(params)


ITEMS = ("params", "train", "data", "loop", "config")  # the items of a step's checkpoint, each a subfolder
DAMAGED = "damaged_checkpoints"  # where the trainer moves a checkpoint whose files fail their checksums


class Checkpointer:
  """Asynchronous saves every N steps; keeps the last `keep` and the best by eval loss.

  A checkpoint is complete when its folder has its final name (orbax renames it when the save
  is done), `commit_success.txt` and `checksums.json` whose sizes and hashes its files match;
  that one definition holds for every command (`damage`).
  """

  def __init__(self, workdir: str | pathlib.Path, keep: int = 3):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    self.removed_interrupted = _remove_interrupted(self.directory) if jax.process_index() == 0 else []
    self._created = not self.directory.exists()
    self._saving: int | None = None
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=True, preservation_policy=policy, create=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums))
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def _write_checksums(self) -> None:
    """Runs on the primary process once every process has written its files, before the rename."""
    (tmp,) = self.directory.glob(f"{self._saving}.orbax-checkpoint-tmp*")
    checksums.write(tmp, ITEMS)

  def restorable_step(self) -> int | None:
    """The newest complete, intact step, or None; the same answer on every process.

    Process 0 checks the steps from the newest down and moves each damaged one to
    WORKDIR/damaged_checkpoints/ (kept, not deleted, and out of the rotation, which would
    otherwise delete intact checkpoints to make room for it).
    """
    found = -1
    if jax.process_index() == 0:
      for step in sorted(_step_folders(self.directory), reverse=True):
        reason = damage(self.directory / str(step))
        if reason is None:
          found = step
          break
        self._set_aside(step, reason)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      found = int(multihost_utils.broadcast_one_to_all(np.int32(found)))
    self._manager.reload()
    return None if found < 0 else found

  def _set_aside(self, step: int, reason: str) -> None:
    target = self.directory.parent / DAMAGED / str(step)
    while target.exists():
      target = target.with_name(target.name + "+")
    target.parent.mkdir(exist_ok=True)
    (self.directory / str(step)).rename(target)
    print(f"llm-jax: warning: checkpoint {step} is damaged: {reason}; moved it to {target} and using the "
          "checkpoint before it", flush=True)

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, params: Any, train: Any, data_state: dict, config: config_lib.Config,
           metrics: dict[str, float] | None = None, loop_state: dict | None = None) -> None:
    """Starts an asynchronous save; returns once the arrays are copied to host memory.

    `data_state` and `loop_state` are JSON, the same on every process (process 0 writes them).
    """
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train),
        data=ocp.args.JsonSave(data_state), loop=ocp.args.JsonSave(loop_state or {}),
        config=ocp.args.JsonSave(config_lib.to_dict(config)))
    with self._failures_reported():  # the previous save's error surfaces here at the latest
      self._manager.wait_until_finished()
      self._saving = step
      self._manager.save(step, args=args, metrics=metrics, force=True)

  def restore(self, step: int, targets: Callable[[config_lib.ModelConfig], tuple[Any, Any]],
              model: config_lib.ModelConfig) -> tuple[Any, Any, dict, dict]:
    """(params, train, data_state, loop_state) of `step`, placed as the targets' shardings say.

    `targets(model)` returns abstract (params, train) trees with shardings for a model config;
    it is called for the saved layer layout too, so a scanned checkpoint restores into an
    unscanned run (optimizer moments included) and back.
    """
    where = self.directory / str(step)
    saved = self.config(step)
    check_same_architecture(saved.model, model, f"checkpoint {where}")
    saved_layout = dataclasses.replace(model, scan_layers=saved.model.scan_layers)
    params_target, train_target = targets(saved_layout)
    with _read_failures_reported(where):
      restored = self._manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(params_target), train=ocp.args.StandardRestore(train_target),
          data=ocp.args.JsonRestore(), loop=ocp.args.JsonRestore()))
    params, train = restored.params, restored.train
    if saved_layout.scan_layers != model.scan_layers:
      wanted = targets(model)
      shardings = jax.tree.map(lambda t: t.sharding, wanted)
      params, train = jax.jit(lambda tree: convert_layouts(tree, model.scan_layers), out_shardings=shardings)(
          (params, train))
    return params, train, restored.data, restored.loop

  def config(self, step: int) -> config_lib.Config:
    return config_lib.from_dict(_read_json(self.directory / str(step) / "config" / "metadata"))

  def wait(self) -> None:
    with self._failures_reported():
      self._manager.wait_until_finished()

  @contextlib.contextmanager
  def _failures_reported(self):
    """A failed save stops the run with one line naming its cause; the earlier checkpoints are untouched.

    Orbax writes into a temporary folder, so nothing it had finished is damaged. Only a full
    disk (or quota, or file-size limit) is told to free space.
    """
    try:
      yield
    except (OSError, ValueError, RuntimeError) as e:
      reason = _first_line(e)
      fix = "free disk space" if _is_out_of_space(e) else "fix the cause"
      raise CheckpointError(f"saving a checkpoint in {self.directory} failed ({reason}); the earlier checkpoints "
                            f"there are intact: {fix} and rerun to resume") from e

  def close(self) -> None:
    """Waits for the last save; a run that saved nothing leaves no empty checkpoints/ folder behind."""
    self._manager.close()
    if self._created and self.directory.is_dir() and not any(self.directory.iterdir()):
      self.directory.rmdir()


def _first_line(e: BaseException) -> str:
  line = (str(e) or type(e).__name__).strip().splitlines()[0]
  return line if len(line) <= 240 else "..." + line[-200:]  # an OS error is at the end


def _is_out_of_space(e: BaseException) -> bool:
  full = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
  while e is not None:
    if isinstance(e, OSError) and e.errno in full or any(os.strerror(code) in str(e) for code in full):
      return True
    e = e.__cause__ or e.__context__
  return False


@contextlib.contextmanager
def _read_failures_reported(where: pathlib.Path):
  """A checkpoint that passed its checksums but still cannot be read: one line, not a TensorStore trace."""
  try:
    yield
  except (OSError, ValueError, RuntimeError, KeyError) as e:
    raise CheckpointError(f"checkpoint {where} cannot be read ({_first_line(e)}); move it out of the folder to "
                          "use the one before it") from e


def damage(step_dir: pathlib.Path) -> str | None:
  """Why `step_dir` is not a complete, intact checkpoint, or None when it is."""
  if not (step_dir / "commit_success.txt").is_file():
    return "it has no commit_success.txt (its save did not finish)"
  return checksums.damage(step_dir)


def _step_folders(directory: pathlib.Path) -> list[int]:
  return [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()] if directory.is_dir() else []


def convert_layouts(tree: Any, scanned: bool) -> Any:
  """Converts every parameter-shaped subtree (parameters, optimizer moments) to a layer layout."""
  is_params = lambda x: isinstance(x, dict) and "embed_tokens" in x and "layers" in x  # noqa: E731
  return jax.tree.map(lambda x: _in_layout(x, scanned) if is_params(x) else x, tree, is_leaf=is_params)


def _remove_interrupted(directory: pathlib.Path) -> list[str]:
  """Deletes the temporary folders of saves cut off by a kill: never complete, never restorable."""
  if not directory.is_dir():
    return []
  removed = sorted(p.name for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name)
  for name in removed:
    shutil.rmtree(directory / name)
    print(f"llm-jax: removed {name}, a checkpoint save that was interrupted", flush=True)
  return removed


EXPORT_ITEMS = ("params", "config.json")  # what an export's checksums.json covers


def save_params(out: str | pathlib.Path, params: Any, config: config_lib.Config) -> pathlib.Path:
  """Writes a parameters-only checkpoint: `out/params/`, `out/config.json`, then their checksums."""
  out = pathlib.Path(out).absolute()
  out.mkdir(parents=True, exist_ok=True)
  target = out / "params"
  if target.exists():
    raise CheckpointError(f"{target} already exists; choose another --out or remove it")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(target, params)
    checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    (out / "config.json").write_text(config_lib.to_json(config))
    checksums.write(out, EXPORT_ITEMS)
  return out


def find_params(path: str | pathlib.Path) -> tuple[pathlib.Path, config_lib.Config]:
  """Locates the parameters and config of a workdir (its newest intact checkpoint), step folder or export.

  Reads only: a damaged checkpoint in a workdir is reported and passed over, not moved.
  """
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise CheckpointError(f"{path} does not exist; pass a run's workdir, a checkpoint folder or an export")
  if (path / "params").is_dir() and (path / "config.json").is_file():
    _check_intact(path, checksums.damage(path), "export it again")
    return path / "params", config_lib.load_json(path / "config.json")
  if (path / "params").is_dir() and (path / "config" / "metadata").is_file():
    _check_intact(path, damage(path), "pass the run's workdir to use its newest intact checkpoint")
    return path / "params", config_lib.from_dict(_read_json(path / "config" / "metadata"))
  for step in sorted(_step_folders(path / "checkpoints"), reverse=True):
    reason = damage(path / "checkpoints" / str(step))
    if reason is None:
      return find_params(path / "checkpoints" / str(step))
    print(f"llm-jax: warning: skipping checkpoint {step}: {reason}", flush=True)
  raise CheckpointError(f"no complete checkpoint under {path}; train first or pass an export from `llm-jax export`")


def tokenizer_folder(path: str | pathlib.Path) -> pathlib.Path | None:
  """The folder holding the tokenizer saved beside a checkpoint: the folder itself or its run's workdir."""
  path = pathlib.Path(path).absolute()
  for folder in (path, *path.parents[:3]):
    if (folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file():
      return folder
  return None


def _check_intact(path: pathlib.Path, reason: str | None, fix: str) -> None:
  if reason is not None:
    raise CheckpointError(f"checkpoint {path} is damaged: {reason}; {fix}")


def _read_json(path: pathlib.Path) -> Any:
  return json.loads(path.read_text())


def base_checksum(path: str | pathlib.Path) -> str:
  """What identifies a checkpoint's parameters bit for bit: the hash of its checksums.json."""
  params_dir, _ = find_params(path)
  return hashlib.sha256((params_dir.parent / checksums.MANIFEST).read_bytes()).hexdigest()


def restore_params(path: str | pathlib.Path, model: config_lib.ModelConfig | None = None,
                   shardings: Any = None) -> tuple[Any, config_lib.Config]:
  """Parameters only (no optimizer state), in `model`'s layout, placed by `shardings`.

  Without `model` the saved architecture is used; without `shardings` the parameters land on
  the default device. A LoRA run's checkpoint comes back as its base with the adapters merged in.
  """
  params_dir, saved = find_params(path)
  if saved.finetune.lora_rank:
    return _restore_lora(params_dir, saved, model or saved.model, shardings)
  model = model or saved.model
  check_same_architecture(saved.model, model, str(params_dir.parent))
  saved_model = dataclasses.replace(model, scan_layers=saved.model.scan_layers)
  abstract = abstract_params(saved_model)
  if shardings is not None and saved_model.scan_layers == model.scan_layers:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
  with ocp.StandardCheckpointer() as checkpointer, _read_failures_reported(params_dir.parent):
    params = checkpointer.restore(params_dir, abstract)  # orbax casts to the target's dtype
  params = _in_layout(params, model.scan_layers)
  if shardings is not None:
    params = jax.device_put(params, shardings)
  return params, dataclasses.replace(saved, model=model)


def abstract_params(model: config_lib.ModelConfig) -> Any:
  """The shapes and dtypes a checkpoint of `model` holds: int8 weights and their scales where model.quantize says."""
  abstract = transformer.abstract_params(model)
  if model.quantize == "none":
    return abstract
  return jax.eval_shape(lambda p: quant.quantize(p, model.quantize_embeddings), abstract)


def _restore_lora(params_dir: pathlib.Path, saved: config_lib.Config, model: config_lib.ModelConfig,
                  shardings: Any) -> tuple[Any, config_lib.Config]:
  """The base (`train.init_from`, the very one the adapters were trained on) with the adapters merged in."""
  from llm_jax.model import lora
  base_path = saved.train.init_from
  if base_checksum(base_path) != saved.finetune.base_checksum:
    raise CheckpointError(f"the LoRA adapters in {params_dir.parent} were trained on another base than the one now "
                          f"at {base_path}; put that base back, or train the adapters again on this one")
  layout = dataclasses.replace(model, scan_layers=saved.model.scan_layers)
  base, _ = restore_params(base_path, layout)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.eval_shape(lambda: lora.init(base, layout, saved.finetune, jax.random.key(0)))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
  with ocp.StandardCheckpointer() as checkpointer, _read_failures_reported(params_dir.parent):
    adapters = checkpointer.restore(params_dir, abstract)
  params = _in_layout(lora.merge(base, adapters, saved.finetune), model.scan_layers)
  if shardings is not None:
    params = jax.device_put(params, shardings)
  plain = config_lib.replace(saved, model=model, finetune=config_lib.FinetuneConfig(), train={"init_from": ""})
  return params, plain


def export_params(workdir: str | pathlib.Path, out: str | pathlib.Path, dtype: str | None = None,
                  merge_lora: bool = False, quantize: str = "none", quantize_embeddings: bool = False) -> pathlib.Path:
  """`llm-jax export`: the latest parameters (optionally quantized and cast) as a parameters-only checkpoint.

  A LoRA run exports only with `merge_lora`: its base with the adapters merged in, plain weights.
  `quantize="int8"` rounds the float weights (model/quant.py) before `dtype` casts what stays float.
  """
  saved = find_params(workdir)[1]
  if saved.finetune.lora_rank and not merge_lora:
    raise CheckpointError(f"{workdir} is a LoRA run (adapters on {saved.train.init_from}); pass --merge-lora to "
                          "export the base with the adapters merged in")
  if quantize != "none" and saved.model.quantize != "none":
    raise CheckpointError(f"{workdir} is already quantized ({saved.model.quantize}); export the float checkpoint it "
                          "came from")
  params, config = restore_params(workdir)
  if quantize != "none":
    params = quant.quantize(params, quantize_embeddings)
    config = config_lib.replace(config, model={"quantize": quantize, "quantize_embeddings": quantize_embeddings})
  if dtype:
    params = quant.cast(params, dtype)
    config = config_lib.replace(config, model={"param_dtype": dtype})
  out = save_params(out, params, config)
  folder = tokenizer_folder(workdir)
  for name in ("tokenizer.model", *hf_tokenizer.FILES) if folder else ():
    if (folder / name).is_file():
      shutil.copy(folder / name, out / name)
  return out
