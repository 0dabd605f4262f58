"""Bad input through the real `llm-jax` command (issue 11): one line naming the problem and the fix,
exit status 2, and every earlier file byte for byte as it was.

Each test names the issue's case it covers. The trainer's own workdir checks (cases 4 and 15's
read-only and file workdirs) are tested on `llm_jax.workdir` in test_workdir.py.
"""

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llm_jax
from llm_jax import checkpoint
from llm_jax import config as config_lib
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.interop import hf
from llm_jax.model import presets, transformer

MODEL = dataclasses.replace(presets.get("tiny-llama"), vocab_size=tokenizer_lib.BYTE_VOCAB_SIZE)
CONFIG = config_lib.Config(model=MODEL)


def cli(*args: str, cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "llm_jax", *map(str, args)], capture_output=True, text=True,
                        env={**os.environ, "CI": "true"}, timeout=600, cwd=cwd)


def error_line(result: subprocess.CompletedProcess) -> str:
  """The one line a refused command prints, after checking that it is the only one and the status is 2."""
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-3000:]
  assert len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith("llm-jax: error: ")
  return lines[0].removeprefix("llm-jax: error: ")


def snapshot(folder: pathlib.Path) -> dict[str, bytes | None]:
  """Every path under `folder` with its bytes (None for folders), to show that nothing changed."""
  return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> pathlib.Path:
  """A real run (one orbax checkpoint, config, metrics, tokenizer) and a transformers folder of its weights."""
  root = tmp_path_factory.mktemp("template")
  run = root / "run"
  params = transformer.init_params(MODEL, jax.random.key(0))
  ckpt = checkpoint.Checkpointer(run, keep=2)
  ckpt.save(1, params, {"step": jnp.int32(1)}, {"position": 0}, CONFIG)
  ckpt.wait()
  ckpt.close()
  (run / "config.json").write_text(config_lib.to_json(CONFIG))
  (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.5}) + "\n")
  tokenizer_lib.ByteTokenizer().save(run)
  hf.save_hf(params, MODEL, root / "hf")
  return root


@pytest.fixture
def run(template, tmp_path) -> pathlib.Path:
  return shutil.copytree(template / "run", tmp_path / "run")


@pytest.fixture
def hf_dir(template, tmp_path) -> pathlib.Path:
  return shutil.copytree(template / "hf", tmp_path / "hf")


# ---------------------------------------------------------------------------------------------
# Cases 2 and 3: an output folder that holds a run.


def test_export_into_the_run_it_reads_is_refused(run):
  """Case 2: `export --workdir RUN --out RUN` overwrote config.json and left a params/ that hid the run."""
  before = snapshot(run)
  assert error_line(cli("export", "--workdir", run, "--out", run)) == (
      f"--out {run} holds a training run (checkpoints, config.json); export would overwrite its config.json and "
      f"hide its checkpoints: pass another --out, e.g. {run}-export")
  assert snapshot(run) == before


def test_export_into_another_run_is_refused(run, template, tmp_path):
  """Case 2, with the other run as the target."""
  other = shutil.copytree(template / "run", tmp_path / "other")
  before = snapshot(other)
  assert "holds a training run" in error_line(cli("export", "--workdir", run, "--out", other, "--dtype", "bfloat16"))
  assert snapshot(other) == before


def test_convert_from_hf_into_a_run_is_refused(run, hf_dir):
  """Case 3: `convert --from-hf HF --out RUN` exited 0 after overwriting config.json."""
  before = snapshot(run)
  assert error_line(cli("convert", "--from-hf", hf_dir, "--out", run)) == (
      f"--out {run} holds a training run (checkpoints, config.json); convert --from-hf would overwrite its "
      f"config.json and hide its checkpoints: pass another --out, e.g. {run}-export")
  assert snapshot(run) == before


def test_convert_to_hf_into_a_run_is_refused(run, template, tmp_path):
  """Case 2's rule for `convert --to-hf`: its out is refused when it holds a run."""
  other = shutil.copytree(template / "run", tmp_path / "other")
  before = snapshot(other)
  assert "convert --to-hf would overwrite" in error_line(cli("convert", "--to-hf", run, "--out", other))
  assert snapshot(other) == before


# ---------------------------------------------------------------------------------------------
# Case 7: export dtypes.


@pytest.mark.parametrize("dtype, message", [
    ("float16", "--dtype float16: expected one of float32, bfloat16 (the parameter dtypes llm_jax.load and generate "
                "read)"),
    ("int8", "--dtype int8: integer weights are quantization; pass --quantize int8 (and --dtype one of float32, "
             "bfloat16 for the parameters that stay float)"),
    ("bfloat17", "--dtype bfloat17: expected one of float32, bfloat16 (the parameter dtypes llm_jax.load and "
                 "generate read)"),
])
def test_export_dtype_the_loader_cannot_read_is_refused(run, tmp_path, dtype, message):
  before = snapshot(run)
  assert error_line(cli("export", "--workdir", run, "--out", tmp_path / "export", "--dtype", dtype)) == message
  assert not (tmp_path / "export").exists()
  assert snapshot(run) == before


def test_export_bfloat16_is_what_load_reads_back(run, tmp_path):
  """The accepted dtypes still export, and the export loads in that dtype with the same values."""
  result = cli("export", "--workdir", run, "--out", tmp_path / "export", "--dtype", "bfloat16")
  assert result.returncode == 0, result.stderr[-3000:]
  model = llm_jax.load(tmp_path / "export")
  assert model.config.model.param_dtype == "bfloat16"
  original = llm_jax.load(run).params["embed_tokens"]["embedding"]
  exported = model.params["embed_tokens"]["embedding"]
  assert exported.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(exported), np.asarray(original.astype(jnp.bfloat16)))


# ---------------------------------------------------------------------------------------------
# Cases 5, 8 and 10: values caught before compiling (all of them: test_validate.py).


@pytest.mark.parametrize("override, message", [
    ("optim.learning_rate=-1", "optim.learning_rate=-1.0: expected a finite value >= 0 (the peak learning rate; 0 "
                               "freezes the weights)"),  # case 5
    ("train.steps=0", "train.steps=0: expected a finite value >= 1 (0 would train nothing and leave random "
                      "weights)"),  # case 8
    ("train.log_every=0", "train.log_every=0: expected a finite value >= 1 (log every N steps)"),  # case 10
    ("data.eval_fraction=0", "data.eval_fraction=0.0: evaluation holds out that share of text:{corpus}, so it must "
                             "lie strictly between 0 and 1; set e.g. 0.1, set data.eval_source, or set "
                             "train.eval_every=0"),  # case 10
])
def test_train_rejects_bad_values_before_compiling(tmp_path, override, message):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("To be, or not to be.\n\nThat is the question.\n" * 20)
  workdir = tmp_path / "run"
  result = cli("train", "--config", "tests/gpt2_bytes_config.py", "--workdir", workdir, f"data.source=text:{corpus}",
               override, cwd=pathlib.Path(__file__).parents[1])
  assert error_line(result) == message.format(corpus=corpus)
  assert not workdir.exists()


# ---------------------------------------------------------------------------------------------
# Case 9: tokenizer train --out a folder.


def test_tokenizer_train_out_a_folder_is_refused(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("some text to train on\n" * 50)
  folder = tmp_path / "tok"
  folder.mkdir()
  (folder / "keep.txt").write_text("mine")
  (tmp_path / "tok.model").write_text("an older model")  # what sentencepiece used to overwrite beside it
  before = snapshot(tmp_path)
  assert error_line(cli("tokenizer", "train", "--input", corpus, "--vocab-size", "300", "--out", folder)) == (
      f"--out {folder} names a folder; pass the path of the .model file to write, e.g. {folder / 'tokenizer.model'}")
  assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# Case 15: plain tracebacks before.


def test_export_out_an_existing_file_is_refused(run, tmp_path):
  out = tmp_path / "export"
  out.write_text("a file of the user's")
  before = snapshot(tmp_path)
  assert error_line(cli("export", "--workdir", run, "--out", out)) == (
      f"--out {out} is a file; export writes a folder: pass a new or empty folder path")
  assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_convert_from_a_corrupt_safetensors_is_refused(hf_dir, tmp_path, damage):
  weights = hf_dir / "model.safetensors"
  data = weights.read_bytes()
  weights.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"\xff" * 64 + data[64:])
  out = tmp_path / "converted"
  line = error_line(cli("convert", "--from-hf", hf_dir, "--out", out))
  assert line.startswith(f"{weights} is not a readable safetensors file (Error while deserializing header: ")
  assert line.endswith("); download or save the model again")
  assert not out.exists()


def test_config_py_with_a_syntax_error(tmp_path):
  config = tmp_path / "broken.py"
  config.write_text("from llm_jax import config\n\ndef get_config(:\n  return config.Config()\n")
  assert error_line(cli("train", "--config", config, "--workdir", tmp_path / "run")) == (
      f"{config}:3: invalid syntax (a Python syntax error); fix that line of the config file")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.py"]


@pytest.mark.parametrize("content, message", [
    (b'{"model": {"num_layers": 2,}}', "{path} is not valid JSON (Expecting property name enclosed in double quotes "
                                       "at line 1 column 28); fix it, or pass a config.json written by llm-jax or a "
                                       "configs/NAME.py"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "{path} is not a JSON text file (it holds binary data); pass a config.json "
                                   "written by llm-jax or a configs/NAME.py"),
    (b"[1, 2]", "{path} holds a JSON list, not an object of config sections; pass a config.json written by llm-jax"),
], ids=["not-json", "binary", "a-list"])
def test_config_json_that_is_not_a_config(tmp_path, content, message):
  path = tmp_path / "config.json"
  path.write_bytes(content)
  assert error_line(cli("train", "--config", path, "--workdir", tmp_path / "run")) == message.format(path=path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


@pytest.mark.parametrize("kind, message", [
    ("missing", "--prompts-file {path}: no such file; check the path"),
    ("binary", "--prompts-file {path} is binary (a NUL byte at offset 2); pass a text file with one prompt per line"),
    ("latin-1", "--prompts-file {path} is not UTF-8 text (byte 3: invalid continuation byte); pass a text file with "
                "one prompt per line"),
    ("folder", "--prompts-file {path} is a folder; pass a text file with one prompt per line"),
    ("blank", "--prompts-file {path} holds no prompt (every line is blank); write one prompt per line"),
])
def test_prompts_file_that_cannot_serve(run, tmp_path, kind, message):
  path = tmp_path / "prompts"
  if kind == "binary":
    path.write_bytes(b"AB\x00\x01\x02")
  elif kind == "latin-1":
    path.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
  elif kind == "folder":
    path.mkdir()
  elif kind == "blank":
    path.write_text("\n   \n\t\n")
  before = snapshot(tmp_path)
  line = error_line(cli("generate", "--workdir", run, "--prompts-file", path))
  assert line == message.format(path=path)
  assert "pass --prompt" not in line
  assert snapshot(tmp_path) == before


def test_empty_prompt_is_conditioned_on_bos_and_says_so(run):
  """`--prompt ''`: documented choice, bos (Llama-family models begin with it); the command now says so."""
  result = cli("generate", "--workdir", run, "--prompt", "", "--max-new-tokens", "3", "--json")
  assert result.returncode == 0, result.stderr[-3000:]
  assert [line for line in result.stderr.splitlines() if line.startswith("llm-jax:")] == [
      "llm-jax: note: an empty prompt is conditioned on the bos token alone, which models trained by llm-jax never "
      "see; give them some text, e.g. a newline"]
  record = json.loads(result.stdout.strip().splitlines()[-1])
  assert record["prompt"] == "" and record["prompt_token_ids"] == [tokenizer_lib.BOS_ID]
  assert len(record["token_ids"]) == 3


# ---------------------------------------------------------------------------------------------
# Minor: file modes.


def test_to_hf_weights_get_an_ordinary_files_mode(run, tmp_path):
  """`convert --to-hf` wrote model.safetensors with mode 0600 (safetensors' temporary file)."""
  out = pathlib.Path(hf.export_hf(run, tmp_path / "hf"))
  umask = os.umask(0o022)
  os.umask(umask)
  assert oct((out / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~umask)
  assert oct((out / "config.json").stat().st_mode & 0o777) == oct(0o666 & ~umask)
