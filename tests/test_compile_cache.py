"""The `llm-jax` command's persistent compilation cache: where it goes, when it is off, and that a second run loads
what the first compiled and computes the same losses."""

import os
import subprocess

from test_train_loop import read_metrics, tiny_run_args  # tests/test_train_loop.py

from llm_jax import compile_cache


def test_default_folder_unless_the_user_chose_one_or_turned_it_off(tmp_path):
  environ = {"XDG_CACHE_HOME": str(tmp_path)}
  assert compile_cache.use_default(environ) == str(tmp_path / "llm-jax" / "xla")
  assert environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "llm-jax" / "xla")
  assert environ["JAX_COMPILATION_CACHE_MAX_SIZE"] == str(4 << 30)

  own = {"JAX_COMPILATION_CACHE_DIR": "/mine", "XDG_CACHE_HOME": str(tmp_path)}
  assert compile_cache.use_default(own) is None and own == {"JAX_COMPILATION_CACHE_DIR": "/mine",
                                                            "XDG_CACHE_HOME": str(tmp_path)}
  off = {"LLM_JAX_COMPILATION_CACHE": "0", "XDG_CACHE_HOME": str(tmp_path)}
  assert compile_cache.use_default(off) is None and "JAX_COMPILATION_CACHE_DIR" not in off


def test_a_second_run_loads_the_first_runs_executables_and_logs_the_same_losses(shared_data, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the test session's own cache
  env.update(CI="true", XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  folder = tmp_path / "xdg" / "llm-jax" / "xla"
  entries = []
  for name in ("first", "second"):
    result = subprocess.run(tiny_run_args(shared_data, tmp_path / name, "train.steps=3", "train.eval_every=0",
                                          "train.log_every=1"), capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert folder.is_dir(), f"the {name} run wrote no cache folder"
    entries.append(sorted(p.name for p in folder.iterdir()))
  assert entries[0], "the first run wrote nothing to the cache"
  assert entries[1] == entries[0]  # every compilation of the second run was a hit
  first, second = read_metrics(tmp_path / "first"), read_metrics(tmp_path / "second")
  assert [first[s]["loss"] for s in (1, 2, 3)] == [second[s]["loss"] for s in (1, 2, 3)]
