"""Pictures of runs: loss against steps and tokens, learning rate and throughput, from metrics.jsonl.

`figure(workdirs)` returns a matplotlib Figure with four axes, each run one colour and named by
its workdir: training loss (solid) and eval loss (dashed, dots) against steps and against
tokens (step x batch_size x seq_len of the run's config.json: token slots, padding included),
the learning rate, and tokens/s. It draws through the object API on the Agg canvas, never
pyplot, so it holds no global state and may run in the trainer's background thread. `Curves`
is that thread: the trainer redraws WORKDIR/curves.png at each evaluation and at the end.
"""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
from typing import Any, Callable

from llm_jax.errors import UserError

AXES = (  # (title, x, y, y label): what each axis of `figure` shows, in order
    ("loss against steps", "step", "loss", "loss (nats per token)"),
    ("loss against tokens", "tokens", "loss", "loss (nats per token)"),
    ("learning rate", "step", "learning_rate", "learning rate"),
    ("throughput", "step", "tokens_per_sec", "tokens/s"),
)


class PlotError(UserError):
  """A workdir that holds nothing to plot."""


def read_records(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  """The records of metrics.jsonl in step order, the last one of each step (the test
  figures of a classification run rewrite its last step); a line cut short by a kill is skipped."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.is_file():
    raise PlotError(f"{path} not found: pass the workdir of a run (llm-jax train --workdir DIR writes it)")
  records = {}
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and isinstance(record.get("step"), int):
      records[record["step"]] = record
  return [records[step] for step in sorted(records)]


def tokens_per_step(workdir: str | pathlib.Path) -> int | None:
  """train.batch_size x data.seq_len from the run's config.json; None when it has none."""
  try:
    raw = json.loads((pathlib.Path(workdir) / "config.json").read_text(encoding="utf-8"))
    return int(raw["train"]["batch_size"]) * int(raw["data"]["seq_len"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def series(records: list[dict[str, Any]], key: str, tokens: int | None = None) -> tuple[list, list]:
  """(steps, values) of the records that hold `key`; steps become tokens when `tokens` is given."""
  points = [(r["step"] * (tokens or 1), r[key]) for r in records if isinstance(r.get(key), (int, float))]
  return [x for x, _ in points], [y for _, y in points]


def run_names(workdirs: list[str | pathlib.Path]) -> list[str]:
  """Each workdir's folder name; the paths as given where two names would be the same."""
  names = [pathlib.Path(w).absolute().name for w in workdirs]
  return names if len(set(names)) == len(names) else [str(w) for w in workdirs]


def figure(workdirs: list[str | pathlib.Path]):
  """The four axes of AXES with every run overlaid; lines are labelled "NAME train" / "NAME eval"
  on the loss axes and "NAME" on the others."""
  from matplotlib.figure import Figure
  runs = [(name, read_records(w), tokens_per_step(w)) for name, w in zip(run_names(workdirs), workdirs)]
  fig = Figure(figsize=(12, 8), layout="constrained")
  axes = fig.subplots(2, 2).flatten()
  for ax, (title, x, y, label) in zip(axes, AXES):
    ax.set(title=title, xlabel="tokens" if x == "tokens" else "step", ylabel=label)
    ax.grid(alpha=0.3)
  for index, (name, records, tokens) in enumerate(runs):
    color = f"C{index % 10}"
    for ax, (_, x, y, _) in zip(axes, AXES):
      if x == "tokens" and tokens is None:
        continue
      scale = tokens if x == "tokens" else None
      if y == "loss":
        ax.plot(*series(records, "loss", scale), color=color, linewidth=1, label=f"{name} train")
        ax.plot(*series(records, "eval_loss", scale), color=color, linestyle="--", marker="o", markersize=3,
                label=f"{name} eval")
      else:
        ax.plot(*series(records, y), color=color, linewidth=1, label=name)
  for ax in axes:
    if ax.lines:
      ax.legend(fontsize="small")
  return fig


def write(workdirs: list[str | pathlib.Path], out: str | pathlib.Path) -> pathlib.Path:
  """Draws `figure(workdirs)` into the PNG `out` (written beside itself, then renamed over)."""
  out = pathlib.Path(out)
  if out.suffix.lower() != ".png":
    raise PlotError(f"--out {out}: expected a .png file name")
  fig = figure(workdirs)
  temporary = out.with_name(f".{out.name}.tmp.png")  # a viewer never sees a half-written picture
  fig.savefig(temporary, dpi=100)
  temporary.replace(out)
  return out


class Curves:
  """WORKDIR/curves.png, redrawn in one background thread so the step loop never waits for it.

  A redraw asked for while one is still running is dropped (`close` draws the last one). A
  failure (matplotlib missing or broken) is reported once through `say` and drawing stops; the
  run goes on.
  """

  def __init__(self, workdir: str | pathlib.Path, say: Callable[[str], None]):
    self._workdir, self._say = pathlib.Path(workdir), say
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llm-jax-curves")
    self._future: concurrent.futures.Future | None = None
    self._failed = False

  def draw(self) -> None:
    if self._future is not None and not self._future.done():
      return
    self._collect()
    if not self._failed:
      self._future = self._pool.submit(write, [self._workdir], self._workdir / "curves.png")

  def close(self) -> None:
    """Waits for a running redraw, then draws the final picture and waits for it too."""
    self._collect()
    self.draw()
    self._collect()
    self._pool.shutdown(wait=True)

  def _collect(self) -> None:
    """Waits for the last redraw, if any, and reports its failure."""
    if self._future is None:
      return
    error, self._future = self._future.exception(), None
    if error is not None:
      self._failed = True
      self._say(f"llm-jax: warning: could not draw {self._workdir / 'curves.png'} ({type(error).__name__}: {error}); "
                "the run goes on without it")
