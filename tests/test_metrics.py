"""metrics.jsonl keeps one record per step when a run resumes after its predecessor logged further."""

import json

from llm_jax.train import metrics


def write_log(path, steps, tail=""):
  path.write_text("".join(json.dumps({"step": s, "loss": 10.0 - s}) + "\n" for s in steps) + tail)


def steps_logged(path):
  return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_drops_the_records_after_the_restored_step(tmp_path):
  log = tmp_path / "metrics.jsonl"
  write_log(log, range(1, 13), tail='{"step": 13, "lo')  # killed at step 13, mid-line; last checkpoint at 10
  reporter = metrics.Reporter(tmp_path, total_steps=20, start_step=10)
  for step in (11, 12, 13):
    reporter.write({"step": step, "loss": 1.0})
  reporter.close()
  assert steps_logged(log) == list(range(1, 14))
  records = [json.loads(line) for line in log.read_text().splitlines()]
  assert records[9] == {"step": 10, "loss": 0.0}  # kept as logged
  assert records[10] == {"step": 11, "loss": 1.0}  # the resumed run's, not the killed one's
  assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_start_from_scratch_drops_every_old_record(tmp_path):
  log = tmp_path / "metrics.jsonl"
  write_log(log, [1, 2, 3])  # a run that died before its first checkpoint
  metrics.Reporter(tmp_path, total_steps=5, start_step=0).close()
  assert log.read_text() == ""


def test_nothing_to_drop_leaves_the_file_as_it_was(tmp_path):
  log = tmp_path / "metrics.jsonl"
  write_log(log, [5, 10])
  before = log.stat().st_ino, log.read_bytes()
  assert metrics.drop_records_after(log, 10) == 0
  assert (log.stat().st_ino, log.read_bytes()) == before  # not even rewritten
  assert metrics.drop_records_after(log, 7) == 1 and steps_logged(log) == [5]
  assert metrics.drop_records_after(tmp_path / "missing.jsonl", 0) == 0
