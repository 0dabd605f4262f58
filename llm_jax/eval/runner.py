"""`llm-jax eval --tasks ...`: evaluate one workdir on local tasks, print a table, write WORKDIR/eval/<task>.json.

Everything that can be checked without the model is checked first (task names, overrides, data
files, the tokenizer), so a typo costs no loading. The model is what `llm_jax.load` returns for
the workdir's newest intact checkpoint (a LoRA run's base with its adapters merged in); the
engine splits each batch over every local device, the parameters replicated. One process.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
import time
from typing import Any, Sequence, TextIO

from llm_jax import checkpoint, distributed, sharding
from llm_jax import config as config_lib
from llm_jax.eval import tasks as tasks_lib
from llm_jax.eval.tasks import EvalError


def run(workdir: str | pathlib.Path, names: Sequence[str], *, limit: int | None = None, batch_size: int = 32,
        overrides: Sequence[str] = (), out: TextIO = sys.stdout) -> list[dict[str, Any]]:
  """Evaluates `workdir` on each task of `names`; returns the records written to WORKDIR/eval/<task>.json."""
  names = list(names)
  tasks_lib.check_names(names)
  if limit is not None and limit < 1:
    raise EvalError(f"--limit {limit}: expected at least 1 (or leave it out to evaluate everything)")
  if batch_size < 1:
    raise EvalError(f"--batch-size {batch_size}: expected at least 1")
  params_dir, saved = checkpoint.find_params(workdir)
  config = config_lib.override(saved, list(overrides))
  readers = [tasks_lib.reader(name, config.eval) for name in names]
  if checkpoint.tokenizer_folder(params_dir.parent) is None:
    raise EvalError(f"{workdir} has no tokenizer beside its checkpoint (tokenizer.json or tokenizer.model), and "
                    f"every task reads text; copy the tokenizer the model was trained with into {workdir}")
  try:
    distributed.set_cpu_devices(config.mesh.cpu_devices)  # a fresh process splits a CPU host as the run did
  except config_lib.ConfigError:
    pass  # JAX already runs (a notebook, a test) with other devices: the figures do not depend on them
  from llm_jax import handle
  changes_model = any(o.startswith("model.") for o in overrides)
  model = handle.load(params_dir.parent, model=config.model if changes_model else None)
  settings = tasks_lib.Settings(limit=limit, batch_size=batch_size, overlap=config.eval.overlap,
                                mesh=sharding.make_mesh(config_lib.MeshConfig(data=-1, fsdp=1, tensor=1)))
  step = int(params_dir.parent.name) if params_dir.parent.name.isdigit() else None
  folder = pathlib.Path(workdir) / "eval"
  records = []
  for task in readers:
    start = time.perf_counter()
    figures = task.evaluate(model, settings)
    record = {"task": task.name, "figures": figures, "model_step": step, "checkpoint": str(params_dir.parent),
              "data": {k: str(v) for k, v in task.files.items()}, "limit": limit, "batch_size": batch_size,
              "seconds": round(time.perf_counter() - start, 3), "config": config_lib.to_dict(config)}
    path = folder / f"{file_name(task.name)}.json"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    records.append({**record, "path": str(path)})
  print(table(records), file=out, flush=True)
  return records


def file_name(task: str) -> str:
  """`text:docs/*.txt` -> `text-docs_.txt`: a task name as one safe file name."""
  return re.sub(r"[^A-Za-z0-9.-]+", "_", task.replace(":", "-", 1)).strip("_.") or "task"


def _value(value: Any) -> str:
  if isinstance(value, int):
    return f"{value:,}"
  return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4f}"


def table(records: Sequence[dict[str, Any]]) -> str:
  """One row per figure, the task named on its first; then where each task's JSON went and how long it took."""
  rows = [("task", "metric", "value")]
  for record in records:
    for i, (metric, value) in enumerate(record["figures"].items()):
      rows.append((record["task"] if i == 0 else "", metric, _value(value)))
  widths = [max(len(row[c]) for row in rows) for c in range(3)]
  lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  step = records[0]["model_step"] if records else None
  lines += [f"wrote {r['path']} ({r['seconds']:.1f} s)" for r in records]
  return "\n".join(([f"model: {records[0]['checkpoint']}" + (f" (step {step})" if step is not None else "")]
                    if records else []) + lines)
