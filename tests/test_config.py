"""Configuration: overrides, typing, validation errors, config files and JSON round trips."""

import pathlib
import subprocess
import sys

import pytest

from llm_jax import config as config_lib
from llm_jax.config import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_overrides_parse_to_field_types():
  cfg = config_lib.override(config_lib.Config(), [
      "model.num_layers=2", "optim.learning_rate=1e-3", "model.scan_layers=false", "data.source=text:a/*.txt",
      "train.batch_size=1_024", "optim.weight_decay=0"])
  assert cfg.model.num_layers == 2 and cfg.optim.learning_rate == 1e-3 and cfg.model.scan_layers is False
  assert cfg.data.source == "text:a/*.txt" and cfg.train.batch_size == 1024
  assert isinstance(cfg.optim.weight_decay, float)
  assert config_lib.Config().model.num_layers != 2  # the original is untouched (frozen)


def test_value_containing_equals_sign():
  cfg = config_lib.override(config_lib.Config(), ["sample.prompt=a=b"])
  assert cfg.sample.prompt == "a=b"


@pytest.mark.parametrize("key, hint", [
    ("model.num_layer", "model.num_layers"),
    ("train.stpes", "train.steps"),
    ("mesh.fdsp", "mesh.fsdp"),
    ("model.steps", "train.steps"),  # right field, wrong section
])
def test_unknown_key_suggests_closest(key, hint):
  with pytest.raises(ConfigError, match=rf"unknown config key '{key}'; did you mean .*{hint}"):
    config_lib.override(config_lib.Config(), [f"{key}=1"])


@pytest.mark.parametrize("assignment, expected", [
    ("model.num_layers=two", "model.num_layers='two': expected int"),
    ("optim.learning_rate=fast", "expected float"),
    ("model.scan_layers=maybe", "expected bool"),
    ("model.norm=batchnorm", "model.norm='batchnorm': expected one of layernorm, rmsnorm"),
])
def test_wrong_type_names_key_and_type(assignment, expected):
  with pytest.raises(ConfigError, match=expected):
    config_lib.override(config_lib.Config(), [assignment])


def test_malformed_override():
  with pytest.raises(ConfigError, match="is not section.key=value"):
    config_lib.override(config_lib.Config(), ["model.num_layers"])


def test_dict_override_checks_python_types():
  with pytest.raises(ConfigError, match="train.steps='10': expected int, got str"):
    config_lib.override(config_lib.Config(), {"train.steps": "10"})
  with pytest.raises(ConfigError, match="expected int, got bool"):
    config_lib.override(config_lib.Config(), {"train.steps": True})


def valid(**sections):
  return config_lib.replace(config_lib.Config(), **sections)


@pytest.mark.parametrize("sections, devices, message", [
    (dict(model=dict(d_model=250, num_heads=4)), 1, "model.num_heads=4 does not divide model.d_model=250"),
    (dict(model=dict(num_heads=4, num_kv_heads=3)), 1, "model.num_kv_heads=3 does not divide model.num_heads=4"),
    (dict(mesh=dict(data=2, fsdp=2, tensor=1)), 8, r"= 4 devices, but 8 are available"),
    (dict(mesh=dict(data=3, fsdp=-1)), 8, "3 does not divide 8"),
    (dict(mesh=dict(data=-1, fsdp=-1)), 8, "at most one of"),
    (dict(train=dict(batch_size=12)), 8, r"train.batch_size=12 .* not divisible by mesh data x fsdp = 1 x 8 = 8"),
    (dict(train=dict(batch_size=16, microbatches=4)), 8, r"per microbatch 4\) is not divisible"),
    (dict(data=dict(seq_len=512), model=dict(max_len=256)), 1, "data.seq_len=512 exceeds model.max_len=256"),
])
def test_impossible_combinations_fail_before_compiling(sections, devices, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(valid(**sections), devices)


def test_mesh_minus_one_takes_remaining_devices():
  assert config_lib.validate(valid(mesh=dict(data=2, fsdp=-1, tensor=2), train=dict(batch_size=8)), 8) == (2, 2, 2)
  assert config_lib.resolve_mesh(config_lib.MeshConfig(), 8) == (1, 8, 1)


def test_json_round_trip(tmp_path):
  cfg = config_lib.override(config_lib.Config(), ["model.num_layers=3", "optim.name=lion", "sample.top_p=0.9"])
  path = tmp_path / "config.json"
  path.write_text(config_lib.to_json(cfg))
  assert config_lib.load_json(path) == cfg


def test_every_shipped_config_loads_and_validates():
  files = sorted((REPO / "configs").glob("*.py"))
  assert files
  for path in files:
    cfg = config_lib.load_file(path)
    config_lib.validate_model(cfg.model)
    assert "llm-jax" in path.read_text().split('"""')[1], f"{path.name}: docstring must show the command"


def test_config_file_errors(tmp_path):
  with pytest.raises(ConfigError, match="not found"):
    config_lib.load_file(tmp_path / "missing.py")
  bad = tmp_path / "bad.py"
  bad.write_text("X = 1\n")
  with pytest.raises(ConfigError, match="has no get_config"):
    config_lib.load_file(bad)


def test_cli_reports_config_errors_in_one_line(tmp_path):
  result = subprocess.run([sys.executable, "-m", "llm_jax", "train", "--config", str(REPO / "configs/tiny_shakespeare.py"),
                           "--workdir", str(tmp_path), "model.num_layer=2"], capture_output=True, text=True)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "llm-jax: error: unknown config key 'model.num_layer'; did you mean model.num_layers or model.scan_layers "
      "or model.num_classes?"]
