"""Pictures of runs: the figure's lines hold metrics.jsonl's values; the CLI and the Reporter write the PNG."""

import json

import numpy as np
import pytest

from llm_jax import cli
from llm_jax.train import metrics, plot

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(workdir, steps, eval_steps, batch_size=4, seq_len=8, offset=0.0):
  """A workdir as the trainer leaves it: config.json and one record per logged step."""
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps({"train": {"batch_size": batch_size}, "data": {"seq_len": seq_len}}))
  lines = []
  for step in steps:
    record = {"step": step, "loss": 5.0 - 0.1 * step + offset, "learning_rate": 1e-3 * step,
              "tokens_per_sec": 100.0 + step}
    if step in eval_steps:
      record["eval_loss"] = 5.5 - 0.1 * step + offset
    lines.append(json.dumps(record))
  (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def lines_by_label(ax):
  return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_figure_holds_every_series_of_every_run(tmp_path):
  write_run(tmp_path / "small", steps=[2, 4, 6], eval_steps=[4, 6])
  write_run(tmp_path / "large", steps=[3, 6], eval_steps=[6], batch_size=2, seq_len=16, offset=1.0)
  # a resumed step repeats its record (the last wins) and a kill cut the file's last line short
  with open(tmp_path / "large" / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 6, "loss": 0.25, "learning_rate": 0.5, "tokens_per_sec": 7.0}) + '\n{"step": 9, "lo')
  fig = plot.figure([tmp_path / "small", tmp_path / "large"])
  steps, tokens, lr, throughput = fig.axes
  assert [ax.get_title() for ax in fig.axes] == [title for title, *_ in plot.AXES]
  assert lines_by_label(steps) == {
      "small train": ([2, 4, 6], [4.8, 4.6, 4.4]), "small eval": ([4, 6], [5.1, 4.9]),
      "large train": ([3, 6], [5.7, 0.25]), "large eval": ([], [])}  # step 6's last record has no eval
  small_tokens, large_tokens = lines_by_label(tokens)["small train"], lines_by_label(tokens)["large eval"]
  assert small_tokens[0] == [2 * 32, 4 * 32, 6 * 32] and small_tokens[1] == [4.8, 4.6, 4.4]
  assert large_tokens == ([], [])
  assert lines_by_label(tokens)["large train"][0] == [3 * 32, 6 * 32]
  assert np.allclose(lines_by_label(lr)["small"][1], [2e-3, 4e-3, 6e-3])
  assert lines_by_label(lr)["large"][1] == [3e-3, 0.5]
  assert lines_by_label(throughput) == {"small": ([2, 4, 6], [102.0, 104.0, 106.0]), "large": ([3, 6], [103.0, 7.0])}
  assert {t.get_text() for t in steps.get_legend().get_texts()} == {"small train", "small eval", "large train",
                                                                    "large eval"}


def test_runs_of_the_same_folder_name_are_named_by_path(tmp_path):
  write_run(tmp_path / "a" / "run", steps=[1], eval_steps=[])
  write_run(tmp_path / "b" / "run", steps=[1], eval_steps=[])
  fig = plot.figure([tmp_path / "a" / "run", tmp_path / "b" / "run"])
  assert set(lines_by_label(fig.axes[2])) == {str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")}


def test_plot_command_writes_a_png(tmp_path, capsys):
  write_run(tmp_path / "one", steps=[1, 2], eval_steps=[2])
  write_run(tmp_path / "two", steps=[1, 2], eval_steps=[2])
  assert cli.main(["plot", str(tmp_path / "one")]) == 0
  assert capsys.readouterr().out.strip() == str(tmp_path / "one" / "curves.png")
  assert (tmp_path / "one" / "curves.png").read_bytes().startswith(PNG)
  out = tmp_path / "both.png"
  assert cli.main(["plot", str(tmp_path / "one"), str(tmp_path / "two"), "--out", str(out)]) == 0
  assert out.read_bytes().startswith(PNG) and not list(tmp_path.glob(".*.tmp.png"))


@pytest.mark.parametrize("make, message", [
    (lambda d: None, r"metrics.jsonl not found: pass the workdir of a run"),
])
def test_a_folder_without_metrics_is_one_line(tmp_path, capsys, make, message):
  make(tmp_path)
  assert cli.main(["plot", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("llm-jax: error: ") and "metrics.jsonl not found" in err
  assert cli.main(["plot", str(tmp_path), "--out", str(tmp_path / "x.jpg")]) == 2
  assert "expected a .png file name" in capsys.readouterr().err


@pytest.mark.parametrize("curves", [True, False])
def test_reporter_draws_curves_at_each_eval_and_at_close_unless_told_not_to(tmp_path, curves):
  (tmp_path / "config.json").write_text(json.dumps({"train": {"batch_size": 2}, "data": {"seq_len": 4}}))
  reporter = metrics.Reporter(tmp_path, total_steps=4, curves=curves)
  reporter.write({"step": 1, "loss": 3.0, "learning_rate": 0.1, "tokens_per_sec": 9.0})
  assert not (tmp_path / "curves.png").exists()  # no evaluation yet
  reporter.write({"step": 2, "loss": 2.0, "learning_rate": 0.1, "tokens_per_sec": 9.0, "eval_loss": 2.5})
  reporter.close()
  if curves:
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG)
  else:  # train.curves=false: no picture, the records all the same
    assert not (tmp_path / "curves.png").exists()
  assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_failing_draw_warns_once_and_the_run_goes_on(tmp_path, capsys):
  reporter = metrics.Reporter(tmp_path, total_steps=4)  # no config.json: tokens axis empty, still drawn
  (tmp_path / "curves.png").mkdir()  # the picture cannot replace a folder
  for step in (1, 2):
    reporter.write({"step": step, "loss": 1.0, "eval_loss": 1.0})
    reporter._curves._collect()  # let the first redraw finish before the second is asked for
  reporter.close()
  warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
  assert len(warnings) == 1 and warnings[0].startswith(f"llm-jax: warning: could not draw {tmp_path / 'curves.png'}")
  assert "the run goes on without it" in warnings[0]
  assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
