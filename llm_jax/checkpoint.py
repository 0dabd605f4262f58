"""Where checkpoints are written and read (orbax). Knows pytrees, not the trainer.

A run's workdir holds `checkpoints/<step>/` with four items: `params` (the model's
parameters), `train` (step, optimizer state, RNG), `data` (the data iterator's state, JSON)
and `config` (the resolved config, JSON). Parameters sit apart from the optimizer state so
inference and fine-tuning read only what they need. A parameters-only checkpoint (from
`llm-jax export` or `llm-jax convert`) is a folder with `params/` and `config.json`.

Orbax writes each save into a temporary folder and renames it when complete, so a kill in
the middle of a save leaves the previous checkpoints untouched; the half-written folder is
reported and ignored. Restores take an abstract target with shardings: a checkpoint restores
onto any mesh and any number of processes. Scanned and unscanned layer layouts convert on
restore.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pathlib
import shutil
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from llm_jax import config as config_lib
from llm_jax.errors import UserError
from llm_jax.model import transformer

log = logging.getLogger(__name__)

# Model fields that do not change the parameters' shapes or meaning: a run may change them.
RUNTIME_FIELDS = frozenset({"dtype", "scan_layers", "remat", "attention", "embed_dropout", "attn_dropout",
                            "resid_dropout", "init_std", "scaled_residual_init"})


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


class Checkpointer:
  """Asynchronous saves every N steps; keeps the last `keep` and the best by eval loss."""

  def __init__(self, workdir: str | pathlib.Path, keep: int = 3):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    _report_incomplete(self.directory)
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True, preservation_policy=policy, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, params: Any, train: Any, data_state: dict, config: config_lib.Config,
           metrics: dict[str, float] | None = None) -> None:
    """Starts an asynchronous save; returns once the arrays are copied to host memory."""
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train),
        data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config_lib.to_dict(config)))
    with self._failures_reported():  # the previous save's error surfaces here at the latest
      self._manager.save(step, args=args, metrics=metrics, force=True)

  def restore(self, step: int, targets: Callable[[config_lib.ModelConfig], tuple[Any, Any]],
              model: config_lib.ModelConfig) -> tuple[Any, Any, dict]:
    """(params, train, data_state) of `step`, placed as the targets' shardings say.

    `targets(model)` returns abstract (params, train) trees with shardings for a model config;
    it is called for the saved layer layout too, so a scanned checkpoint restores into an
    unscanned run (optimizer moments included) and back.
    """
    saved = self.config(step)
    check_same_architecture(saved.model, model, f"checkpoint {self.directory / str(step)}")
    saved_layout = dataclasses.replace(model, scan_layers=saved.model.scan_layers)
    params_target, train_target = targets(saved_layout)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params_target), train=ocp.args.StandardRestore(train_target),
        data=ocp.args.JsonRestore()))
    params, train = restored.params, restored.train
    if saved_layout.scan_layers != model.scan_layers:
      wanted = targets(model)
      shardings = jax.tree.map(lambda t: t.sharding, wanted)
      params, train = jax.jit(lambda tree: convert_layouts(tree, model.scan_layers), out_shardings=shardings)(
          (params, train))
    return params, train, restored.data

  def config(self, step: int) -> config_lib.Config:
    return config_lib.from_dict(self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)

  def wait(self) -> None:
    with self._failures_reported():
      self._manager.wait_until_finished()

  @contextlib.contextmanager
  def _failures_reported(self):
    """A failed save (disk full, quota, permissions) stops the run with one clear line.

    Orbax writes into a temporary folder, so the earlier checkpoints are untouched.
    """
    try:
      yield
    except (OSError, ValueError, RuntimeError) as e:
      first_line = (str(e) or type(e).__name__).splitlines()[0]
      reason = first_line if len(first_line) <= 240 else "..." + first_line[-200:]  # the OS error is at the end
      raise CheckpointError(f"saving a checkpoint in {self.directory} failed ({reason}); the earlier checkpoints "
                            f"there are intact: free disk space (or fix the folder) and rerun to resume") from e

  def close(self) -> None:
    self._manager.close()


def convert_layouts(tree: Any, scanned: bool) -> Any:
  """Converts every parameter-shaped subtree (parameters, optimizer moments) to a layer layout."""
  is_params = lambda x: isinstance(x, dict) and "embed_tokens" in x and "layers" in x  # noqa: E731
  return jax.tree.map(lambda x: _in_layout(x, scanned) if is_params(x) else x, tree, is_leaf=is_params)


def _report_incomplete(directory: pathlib.Path) -> None:
  """Warns about saves cut off by a kill; orbax never lists them, so they are never restored."""
  if not directory.is_dir():
    return
  for path in sorted(directory.iterdir()):
    if path.is_dir() and (".orbax-checkpoint-tmp" in path.name or not (path / "commit_success.txt").exists()):
      log.warning("skipping incomplete checkpoint %s (a save was interrupted); using the last complete one", path)
      print(f"llm-jax: warning: skipping incomplete checkpoint {path.name} (the save was interrupted)", flush=True)


def save_params(out: str | pathlib.Path, params: Any, config: config_lib.Config) -> pathlib.Path:
  """Writes a parameters-only checkpoint: `out/params/` and `out/config.json`."""
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
  return out


def find_params(path: str | pathlib.Path) -> tuple[pathlib.Path, config_lib.Config]:
  """Locates the parameters and config of a workdir (latest checkpoint), step folder or export."""
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise CheckpointError(f"{path} does not exist; pass a run's workdir, a checkpoint folder or an export")
  if (path / "params").is_dir() and (path / "config.json").is_file():
    return path / "params", config_lib.load_json(path / "config.json")
  if (path / "params").is_dir() and (path / "config" / "metadata").is_file():
    return path / "params", config_lib.from_dict(_read_json(path / "config" / "metadata"))
  if (path / "checkpoints").is_dir():
    _report_incomplete(path / "checkpoints")
    steps = [int(p.name) for p in (path / "checkpoints").iterdir()
             if p.name.isdigit() and (p / "commit_success.txt").exists()]
    if steps:
      return find_params(path / "checkpoints" / str(max(steps)))
  raise CheckpointError(f"no complete checkpoint under {path}; train first or pass an export from `llm-jax export`")


def _read_json(path: pathlib.Path) -> Any:
  import json
  return json.loads(path.read_text())


def restore_params(path: str | pathlib.Path, model: config_lib.ModelConfig | None = None,
                   shardings: Any = None) -> tuple[Any, config_lib.Config]:
  """Parameters only (no optimizer state), in `model`'s layout, placed by `shardings`.

  Without `model` the saved architecture is used; without `shardings` the parameters land on
  the default device.
  """
  params_dir, saved = find_params(path)
  model = model or saved.model
  check_same_architecture(saved.model, model, str(params_dir.parent))
  saved_model = dataclasses.replace(model, scan_layers=saved.model.scan_layers)
  abstract = transformer.abstract_params(saved_model)
  if shardings is not None and saved_model.scan_layers == model.scan_layers:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(params_dir, abstract)  # orbax casts to the target's dtype
  params = _in_layout(params, model.scan_layers)
  if shardings is not None:
    params = jax.device_put(params, shardings)
  return params, dataclasses.replace(saved, model=model)


def export_params(workdir: str | pathlib.Path, out: str | pathlib.Path, dtype: str | None = None) -> pathlib.Path:
  """`llm-jax export`: the latest parameters (optionally cast) as a parameters-only checkpoint."""
  params, config = restore_params(workdir)
  if dtype:
    params = jax.tree.map(lambda x: x.astype(jax.numpy.dtype(dtype)), params)
    config = config_lib.replace(config, model={"param_dtype": dtype})
  out = save_params(out, params, config)
  for name in ("tokenizer.model", "tokenizer.json"):
    source = pathlib.Path(workdir) / name
    if source.is_file():
      shutil.copy(source, out / name)
  return out
