"""Typed, frozen configuration for every llm-jax command.

A run is described by one `Config` holding six sections (model, mesh, optim, data, train,
sample). Experiments are Python files in `configs/` whose `get_config()` returns a `Config`;
the command line then applies dotted overrides (`model.num_layers=2`). Every section is a
frozen dataclass so a config can be hashed, compared and passed to `jax.jit` as a static
argument, and so nothing mutates a run's settings after validation.

Errors are `ConfigError` with a one-line message that names the key and the fix.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import math
import pathlib
import re
import typing
from typing import Any

from llm_jax.errors import UserError


class ConfigError(UserError, ValueError):
  """A config key, value or combination that cannot run; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """One decoder-only transformer; GPT-2 and Llama differ only in these fields."""

  vocab_size: int = 512
  max_len: int = 256  # longest sequence (learned positions are allocated for this many)
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 4  # grouped-query attention when smaller than num_heads
  d_model: int = 256
  d_ff: int = 1024
  head_dim: int = 0  # 0 means d_model // num_heads
  norm: str = "layernorm"  # "layernorm" (GPT-2, with bias) or "rmsnorm" (Llama)
  norm_eps: float = 1e-5
  position: str = "learned"  # "learned" (GPT-2) or "rope" (Llama)
  rope_theta: float = 10000.0
  rope_scaling: str = "none"  # "none" or "llama3" (Llama 3.1 frequency scaling)
  rope_scaling_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  mlp: str = "gelu"  # "gelu" (GPT-2, tanh approximation) or "swiglu" (Llama)
  use_bias: bool = True  # biases on every projection and norm (GPT-2)
  qkv_bias: bool = False  # biases on q/k/v only (Qwen2); implied by use_bias
  tie_embeddings: bool = True  # the output head reuses the input embedding (GPT-2)
  sliding_window: int = 0  # 0: full causal attention; W: each token sees the last W tokens
  dtype: str = "float32"  # compute dtype of matmuls; softmax, logits and loss stay float32
  param_dtype: str = "float32"
  scan_layers: bool = True  # lax.scan over stacked layers: compile time flat in depth
  remat: str = "save_matmuls"  # "none", "full" or "save_matmuls" (fastest measured, see docs/benchmarks.md)
  attention: str = "auto"  # "auto" (cudnn on NVIDIA GPUs, splash on TPUs, einsum on CPUs), "xla", "cudnn", "splash"
  #                          or "einsum"; see llm_jax/model/attention.py
  init_std: float = 0.02
  scaled_residual_init: bool = True  # GPT-2: residual output projections init with std / sqrt(2 x layers)
  embed_dropout: float = 0.0
  attn_dropout: float = 0.0
  resid_dropout: float = 0.0
  num_classes: int = 0  # >= 2: a classifier [d_model, num_classes] on each example's last token (classification)
  quantize: str = "none"  # "int8": weight-only int8 projections, written by `llm-jax export --quantize` (inference only)
  quantize_embeddings: bool = False  # with quantize: the token embedding and output head in int8 too

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.num_heads


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh (data, fsdp, tensor) and, for several processes, how they meet."""

  data: int = 1
  fsdp: int = -1  # -1 takes every device the other axes leave
  tensor: int = 1
  cpu_devices: int = 0  # CPU hosts: split each into this many XLA devices (0 = one); see distributed.py
  mode: str = "jit"  # "jit": the sharded step (data, fsdp, tensor); "pmap": the same step under jax.pmap, data only
  coordinator_address: str = ""  # "host:port" for jax.distributed; "" = auto (TPU, SLURM) or single process
  num_processes: int = 0  # 0 = from the environment
  process_id: int = -1  # -1 = from the environment


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optax optimizer and learning-rate schedule."""

  name: str = "adamw"  # "adamw", "adafactor", "lion" or "sgd"
  learning_rate: float = 3e-4  # peak
  schedule: str = "cosine"  # "cosine", "linear", "wsd" (warmup-stable-decay) or "constant"
  warmup_steps: int = 100
  decay_fraction: float = 0.2  # wsd: share of the steps spent decaying
  min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  momentum: float = 0.9  # sgd
  weight_decay: float = 0.1
  decay_embeddings: bool = False  # apply weight decay to embeddings too
  grad_clip: float = 1.0  # global-norm clip; 0 disables


Mixture = tuple[tuple[str, float], ...]  # data.mixture: (source, weight) pairs


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where text comes from and how it becomes token rows."""

  source: str = "tfds:tiny_shakespeare"  # tfds:NAME[:SPLIT], text:GLOB, jsonl:GLOB, hf:PATH[:SPLIT], tokens:DIR, json:GLOB
  eval_source: str = ""  # "" = the dataset's validation split, or a held-out fraction of files
  test_source: str = ""  # classification: a tsv: file evaluated once, whole, at the end of the run (test_accuracy)
  eval_fraction: float = 0.1  # local files: share of documents held out for evaluation
  tfds_data_dir: str = ""  # "" = TFDS default (~/tensorflow_datasets)
  tokenizer: str = "byte"  # "byte" or a path to a sentencepiece .model
  seq_len: int = 256
  text_split: str = "file"  # text:GLOB documents: "file" or "blank_line"
  text_field: str = "text"  # jsonl:GLOB field holding the document (and the TFDS feature read)
  chunk_chars: int = 0  # longer documents are cut at line breaks into pieces shuffled apart; 0 = 32 x seq_len
  worker_count: int = 0  # grain worker processes; 0 reads in the main process
  prefetch: int = 2  # batches prepared ahead of the step
  format: str = "text"  # "text" (documents), "alpaca" (instruction/input/output records), "chat" (messages records)
  #                        or "classification" (tsv: rows of sentence<TAB>label, labels 0..model.num_classes-1)
  template: str = "alpaca"  # alpaca/chat: the prompt template, "alpaca", "chatml" or "tokenizer" (its HF chat template)
  chat_template: str = ""  # template=tokenizer: "" = the tokenizer's own; or a tokenizer_config.json, .jinja or folder
  mixture: Mixture = ()  # [(SOURCE, WEIGHT), ...]: each row from one source, drawn by weight; () = data.source alone


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The step loop."""

  steps: int = 1000
  batch_size: int = 32  # global, across every device and process
  microbatches: int = 1  # gradient accumulation inside the step
  seed: int = 0
  log_every: int = 10
  eval_every: int = 100  # 0 disables evaluation
  eval_batches: int = 8
  checkpoint_every: int = 500  # 0 saves only at the end
  keep_checkpoints: int = 3
  init_from: str = ""  # a workdir or checkpoint whose parameters start this run
  z_loss: float = 0.0  # weight of the log(Z)^2 auxiliary loss
  # positions of each row whose logits exist at once in the train step's loss (a divisor of
  # data.seq_len); 0 = all of them. Chunks cut the [batch, length, vocab] logits and their gradient
  # to [batch, chunk, vocab], recomputed in the backward pass (train/losses.py)
  loss_chunk: int = 0
  early_stop_patience: int = 0  # evaluations without improvement before stopping; 0 = never
  max_skipped_steps: int = 10  # consecutive updates skipped (non-finite loss or gradient, spikes) before the run stops
  spike_factor: float = 0.0  # skip an update whose loss exceeds this x the running mean of the loss; 0 = off
  profile_steps: str = ""  # "START:END": a jax.profiler trace of those steps in WORKDIR/profile/; "" = none
  curves: bool = True  # WORKDIR/curves.png, redrawn after each evaluation and at the end (matplotlib, ~1 s of CPU)


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """Text generation, for `llm-jax generate` and the samples a run prints."""

  prompt: str = "\n"
  max_new_tokens: int = 200  # a run's samples: 0 prints none
  temperature: float = 0.8
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1.0 = off
  num_beams: int = 1
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """LoRA: train low-rank adapters on a frozen base (train.init_from); lora_rank 0 trains every parameter."""

  lora_rank: int = 0
  lora_alpha: float = 16.0  # adapters are scaled by lora_alpha / lora_rank
  lora_dropout: float = 0.0  # dropout on each adapter's input
  lora_targets: str = "q,v"  # comma-separated, of q, k, v, o, gate, up, down, head
  base_checksum: str = ""  # set by the trainer: which base the adapters belong to (its checksums.json's hash)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """`llm-jax eval`: where its local tasks read their data, and how rolling perplexity windows overlap."""

  data_dir: str = ""  # "" = ../shared/data beside the repository ($LLM_JAX_SHARED_DATA wins); holds the paths below
  wikitext2: str = "wikitext-2/raw/wiki.test.raw"  # the raw WikiText-2 test split (relative: under data_dir)
  piqa: str = "eval/piqa"  # a folder holding PIQA's valid.jsonl and valid-labels.lst
  sst2: str = "sst2/test.tsv"  # sentence<TAB>label rows (GLUE's SST-2 dev set)
  overlap: int = 0  # rolling windows: tokens of the previous window each next one sees again (lm-eval: 0)


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  mesh: MeshConfig = MeshConfig()
  optim: OptimConfig = OptimConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  sample: SampleConfig = SampleConfig()
  finetune: FinetuneConfig = FinetuneConfig()
  eval: EvalConfig = EvalConfig()


_CHOICES = {
    "model.norm": ("layernorm", "rmsnorm"),
    "model.position": ("learned", "rope"),
    "model.rope_scaling": ("none", "llama3"),
    "model.mlp": ("gelu", "swiglu"),
    "model.remat": ("none", "full", "save_matmuls"),
    "mesh.mode": ("jit", "pmap"),
    "model.attention": ("auto", "xla", "cudnn", "splash", "einsum"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.quantize": ("none", "int8"),
    "optim.name": ("adamw", "adafactor", "lion", "sgd"),
    "optim.schedule": ("cosine", "linear", "wsd", "constant"),
    "data.text_split": ("file", "blank_line"),
    "data.format": ("text", "alpaca", "chat", "classification"),
    "data.template": ("alpaca", "chatml", "tokenizer"),
}


def _fields(section: Any) -> dict[str, dataclasses.Field]:
  return {f.name: f for f in dataclasses.fields(section)}


def all_keys(config: Config = Config()) -> list[str]:
  """Every dotted key an override may name."""
  return [f"{s}.{k}" for s in _fields(config) for k in _fields(getattr(config, s))]


def _field_type(section_cls: type, name: str) -> type:
  return typing.get_type_hints(section_cls)[name]


def _parse(key: str, text: str, kind: type) -> Any:
  if kind == Mixture:
    return _mixture(key, _mixture_text(key, text))
  try:
    if kind is bool:
      lowered = text.strip().lower()
      if lowered in ("true", "1", "yes"):
        return True
      if lowered in ("false", "0", "no"):
        return False
      raise ValueError(text)
    if kind is int:
      return int(text.replace("_", ""))
    if kind is float:
      return float(text)
    return text
  except ValueError:
    raise ConfigError(f"{key}={text!r}: expected {kind.__name__}") from None


def _mixture_text(key: str, text: str) -> Any:
  """`[(SOURCE, WEIGHT), ...]` as a Python literal, or with the sources unquoted: [(text:a/*.txt, 0.8), ...]."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    pairs = re.findall(r"\(\s*([^()]+?)\s*,\s*([^,()]+?)\s*\)", text)
    if not pairs:
      raise ConfigError(f"{key}={text!r}: expected [(SOURCE, WEIGHT), ...], e.g. [(tokens:web, 0.8), (tokens:code, 0.2)]")
    return [(source.strip("'\""), weight) for source, weight in pairs]


def _mixture(key: str, value: Any) -> tuple[tuple[str, float], ...]:
  """(source, weight) pairs, each weight a positive number."""
  pairs = []
  for item in value if isinstance(value, (list, tuple)) else [value]:
    if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
      raise ConfigError(f"{key}: {item!r} is not a (SOURCE, WEIGHT) pair; write [(tokens:web, 0.8), (tokens:code, 0.2)]")
    try:
      weight = float(item[1])
    except (TypeError, ValueError):
      raise ConfigError(f"{key}: the weight of {item[0]} is {item[1]!r}, not a number") from None
    if not weight > 0 or math.isinf(weight):
      raise ConfigError(f"{key}: {item[0]} has weight {item[1]}; weights must be positive numbers (leave a source "
                        "out rather than give it 0)")
    pairs.append((item[0], weight))
  return tuple(pairs)


def _coerce(key: str, value: Any, kind: type) -> Any:
  """Checks a Python value (from a config file or JSON) against the field's type."""
  if kind == Mixture:
    return _mixture(key, value)
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
    raise ConfigError(f"{key}={value!r}: expected {kind.__name__}, got {type(value).__name__}")
  return value


def _unknown(key: str, known: list[str]) -> ConfigError:
  tail = key.rsplit(".", 1)[-1]
  same_field = [k for k in known if k.rsplit(".", 1)[-1] == tail]  # right field, wrong section
  close = list(dict.fromkeys(same_field + difflib.get_close_matches(key, known, n=3, cutoff=0.5)))[:3]
  hint = f"; did you mean {' or '.join(close)}?" if close else f"; valid sections: {sorted({k.split('.')[0] for k in known})}"
  return ConfigError(f"unknown config key {key!r}{hint}")


def override(config: Config, assignments: list[str] | dict[str, Any]) -> Config:
  """Applies `section.key=value` strings (or a {key: value} dict) and returns a new Config.

  Strings are parsed to the field's type; dict values (from JSON or Python) must already have it.
  """
  from_text = not isinstance(assignments, dict)
  items = [_split(a) for a in assignments] if from_text else assignments.items()
  known = all_keys(config)
  for key, value in items:
    if key not in known:
      raise _unknown(key, known)
    section_name, name = key.split(".", 1)
    section = getattr(config, section_name)
    kind = _field_type(type(section), name)
    value = _parse(key, value, kind) if from_text else _coerce(key, value, kind)
    config = dataclasses.replace(config, **{section_name: dataclasses.replace(section, **{name: value})})
  check_choices(config)
  return config


def _split(assignment: str) -> tuple[str, str]:
  key, sep, value = assignment.partition("=")
  if not sep or not key:
    raise ConfigError(f"override {assignment!r} is not section.key=value (e.g. model.num_layers=2)")
  return key.strip(), value


def check_choices(config: Config) -> None:
  for key, choices in _CHOICES.items():
    section, name = key.split(".")
    value = getattr(getattr(config, section), name)
    if value not in choices:
      raise ConfigError(f"{key}={value!r}: expected one of {', '.join(choices)}")


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
  return dataclasses.asdict(config)


def from_dict(raw: dict[str, Any]) -> Config:
  """Rebuilds a Config from `to_dict` output (e.g. a workdir's config.json), checking every key."""
  flat = {}
  for section, values in raw.items():
    if not isinstance(values, dict):
      raise _unknown(section, all_keys())
    flat.update({f"{section}.{k}": v for k, v in values.items()})
  return override(Config(), flat)


def to_json(config: Config) -> str:
  return json.dumps(to_dict(config), indent=2, sort_keys=True)


def load_json(path: str | pathlib.Path) -> Config:
  try:
    raw = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
  except UnicodeDecodeError:
    raise ConfigError(f"{path} is not a JSON text file (it holds binary data); pass a config.json written by "
                      "llm-jax or a configs/NAME.py") from None
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); fix it, or pass a "
                      "config.json written by llm-jax or a configs/NAME.py") from None
  if not isinstance(raw, dict):
    raise ConfigError(f"{path} holds a JSON {type(raw).__name__}, not an object of config sections; pass a "
                      "config.json written by llm-jax")
  return from_dict(raw)


def load_file(path: str | pathlib.Path) -> Config:
  """Imports `configs/NAME.py` and calls its `get_config()`."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"config file {str(path)!r} not found; pass a file such as configs/tiny_shakespeare.py")
  if path.suffix == ".json":
    return load_json(path)
  spec = importlib.util.spec_from_file_location(f"llm_jax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:  # the message and line are the whole story; other errors keep their traceback
    raise ConfigError(f"{e.filename or path}:{e.lineno}: {e.msg} (a Python syntax error); fix that line of the "
                      "config file") from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} has no get_config(); a config file defines get_config() -> llm_jax.config.Config")
  config = module.get_config()
  if not isinstance(config, Config):
    raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, expected llm_jax.config.Config")
  check_choices(config)
  return config


def resolve_mesh(mesh: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """Mesh sizes (data, fsdp, tensor) with a -1 replaced by the devices the others leave."""
  sizes = [mesh.data, mesh.fsdp, mesh.tensor]
  names = ("mesh.data", "mesh.fsdp", "mesh.tensor")
  if sizes.count(-1) > 1:
    raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
  for name, size in zip(names, sizes):
    if size == 0 or size < -1:
      raise ConfigError(f"{name}={size}: expected a positive size or -1 (the remaining devices)")
  if mesh.cpu_devices < 0:
    raise ConfigError(f"mesh.cpu_devices={mesh.cpu_devices}: expected 0 (one device per CPU host) or a positive count")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ConfigError(f"mesh {dict(zip(names, sizes))} cannot fill {num_devices} devices: {fixed} does not divide {num_devices}")
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ConfigError(
        f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
        f"but {num_devices} are available; set the sizes to multiply to {num_devices} or make one -1")
  return tuple(sizes)


def validate_model(model: ModelConfig) -> None:
  """Checks that the architecture is buildable; raises before any compilation."""
  if min(model.num_layers, model.num_heads, model.num_kv_heads, model.d_model, model.d_ff, model.vocab_size, model.max_len) <= 0:
    raise ConfigError("model sizes (num_layers, num_heads, num_kv_heads, d_model, d_ff, vocab_size, max_len) must be positive")
  if not model.head_dim and model.d_model % model.num_heads:
    raise ConfigError(f"model.num_heads={model.num_heads} does not divide model.d_model={model.d_model}; "
                      "choose heads that divide d_model or set model.head_dim")
  if model.num_heads % model.num_kv_heads:
    raise ConfigError(f"model.num_kv_heads={model.num_kv_heads} does not divide model.num_heads={model.num_heads}")
  if model.position == "rope" and model.dim_per_head % 2:
    raise ConfigError(f"rotary positions need an even head dimension, got {model.dim_per_head}")


_FINITE = math.inf  # the upper bound of fields that only need to be finite

# key: (lowest, highest, whether each bound is allowed, what the value means when it is not obvious)
_RANGES: dict[str, tuple[float, float, str, str]] = {
    "optim.learning_rate": (0, _FINITE, "[)", "the peak learning rate; 0 freezes the weights"),
    "optim.b1": (0, 1, "[)", ""),
    "optim.b2": (0, 1, "[)", ""),
    "optim.eps": (0, _FINITE, "()", ""),
    "optim.weight_decay": (0, _FINITE, "[)", ""),
    "optim.warmup_steps": (0, _FINITE, "[)", ""),
    "optim.min_lr_ratio": (0, 1, "[]", "the final learning rate as a fraction of the peak"),
    "optim.decay_fraction": (0, 1, "(]", "the share of the steps that wsd spends decaying"),
    "optim.grad_clip": (0, _FINITE, "[)", "0 disables clipping"),
    "optim.momentum": (0, 1, "[)", ""),
    "train.steps": (1, _FINITE, "[)", "0 would train nothing and leave random weights"),
    "train.log_every": (1, _FINITE, "[)", "log every N steps"),
    "train.eval_every": (0, _FINITE, "[)", "0 disables evaluation"),
    "train.checkpoint_every": (0, _FINITE, "[)", "0 saves only at the end"),
    "train.keep_checkpoints": (1, _FINITE, "[)", "the run needs its latest checkpoint to resume"),
    "train.early_stop_patience": (0, _FINITE, "[)", "0 never stops early"),
    "train.z_loss": (0, _FINITE, "[)", ""),
    "train.loss_chunk": (0, _FINITE, "[)", "0 computes the logits of every position at once"),
    "train.max_skipped_steps": (1, _FINITE, "[)", "skipped updates in a row before the run stops"),
    "train.spike_factor": (0, _FINITE, "[)", "0 turns the spike guard off; above 1 to skip only spikes"),
    "finetune.lora_rank": (0, _FINITE, "[)", "0 trains every parameter"),
    "finetune.lora_alpha": (0, _FINITE, "()", ""),
    "finetune.lora_dropout": (0, 1, "[)", ""),
    "sample.max_new_tokens": (0, _FINITE, "[)", "0: the run prints no samples"),
    "sample.temperature": (0, _FINITE, "[)", "0 is greedy"),
    "sample.top_k": (0, _FINITE, "[)", "0 is off"),
    "sample.top_p": (0, 1, "(]", "1 is off"),
}


def _in_range(value: float, low: float, high: float, bounds: str) -> bool:
  above = low <= value if bounds[0] == "[" else low < value  # written so that NaN is out of every range
  below = value <= high if bounds[1] == "]" else value < high
  return above and below


def _range_text(low: float, high: float, bounds: str) -> str:
  if high == _FINITE:
    return f"a finite value {'>=' if bounds[0] == '[' else '>'} {low:g}"
  return f"a value in {bounds[0]}{low:g}, {high:g}{bounds[1]}"


def validate_ranges(config: Config) -> None:
  """Signs and ranges of the optimizer, step-loop and sample fields, so a typo fails before compiling.

  A negative learning rate climbs the loss, log_every=0 divides by zero after the first step,
  steps=0 trains nothing: each would otherwise surface late or not at all.
  """
  for key, (low, high, bounds, meaning) in _RANGES.items():
    section, name = key.split(".")
    value = getattr(getattr(config, section), name)
    if not _in_range(value, low, high, bounds):
      note = f" ({meaning})" if meaning else ""
      raise ConfigError(f"{key}={value!r}: expected {_range_text(low, high, bounds)}{note}")
  train, data = config.train, config.data
  if config.finetune.lora_rank and not train.init_from:
    raise ConfigError("finetune.lora_rank is set but train.init_from is empty: LoRA adapts a trained base; set "
                      "train.init_from=WORKDIR_OR_EXPORT (or finetune.lora_rank=0 to train every parameter)")
  if 0 < train.spike_factor <= 1:
    raise ConfigError(f"train.spike_factor={train.spike_factor!r}: a factor of 1 or less skips ordinary steps; "
                      "use e.g. 3.0, or 0 to turn the spike guard off")
  if train.loss_chunk and data.seq_len % train.loss_chunk:
    raise ConfigError(f"train.loss_chunk={train.loss_chunk} does not divide data.seq_len={data.seq_len}; use a "
                      "divisor of it (e.g. data.seq_len / 4), or 0 for the whole sequence at once")
  if train.eval_every and train.eval_batches <= 0:
    raise ConfigError(f"train.eval_batches={train.eval_batches}: expected a positive count while evaluation is on "
                      "(or set train.eval_every=0 to turn it off)")
  profile = parse_profile_steps(train.profile_steps)
  if profile and profile[0] > train.steps:
    raise ConfigError(f"train.profile_steps={train.profile_steps!r} starts after the run's last step "
                      f"(train.steps={train.steps}); trace steps within it")
  classes = config.model.num_classes
  if classes < 0 or classes == 1 or (data.format == "classification") != (classes > 0):
    raise ConfigError(f"data.format={data.format} with model.num_classes={classes}: a classifier needs both "
                      "data.format=classification and model.num_classes >= 2 (the labels' count); set them together")
  if classes and config.finetune.lora_rank:
    raise ConfigError("finetune.lora_rank with model.num_classes > 0: the new classifier would stay frozen at its "
                      "random init; fine-tune every parameter (finetune.lora_rank=0)")
  if data.test_source and data.format != "classification":
    raise ConfigError(f"data.test_source={data.test_source!r} is evaluated for accuracy, which needs "
                      "data.format=classification; set it, or clear data.test_source")
  local = data.source.startswith(("text:", "jsonl:", "tsv:"))
  if train.eval_every and local and not data.eval_source and not 0 < data.eval_fraction < 1:
    raise ConfigError(f"data.eval_fraction={data.eval_fraction!r}: evaluation holds out that share of {data.source}, "
                      "so it must lie strictly between 0 and 1; set e.g. 0.1, set data.eval_source, or set "
                      "train.eval_every=0")


def parse_profile_steps(text: str) -> tuple[int, int] | None:
  """`train.profile_steps`: "" (no trace) or "START:END", the first and last step traced (1-based, inclusive)."""
  if not text:
    return None
  first, sep, last = text.partition(":")
  try:
    steps = int(first), int(last)
  except ValueError:
    steps = None
  if not sep or steps is None or not 1 <= steps[0] <= steps[1]:
    raise ConfigError(f"train.profile_steps={text!r}: expected START:END, the first and last step to trace with "
                      "1 <= START <= END (e.g. 10:15), or '' for no trace")
  return steps


def check_export_dtype(dtype: str | None) -> None:
  """`export --dtype`: only the parameter dtypes the loader reads back (model.param_dtype's choices)."""
  allowed = _CHOICES["model.param_dtype"]
  if dtype is None or dtype in allowed:
    return
  if dtype.startswith(("int", "uint")):
    raise ConfigError(f"--dtype {dtype}: integer weights are quantization; pass --quantize int8 (and --dtype one of "
                      f"{', '.join(allowed)} for the parameters that stay float)")
  raise ConfigError(f"--dtype {dtype}: expected one of {', '.join(allowed)} (the parameter dtypes llm_jax.load and "
                    "generate read)")


def validate(config: Config, num_devices: int) -> tuple[int, int, int]:
  """Checks every cross-field constraint of a run; returns the resolved mesh shape."""
  check_choices(config)
  validate_model(config.model)
  validate_ranges(config)
  if config.model.quantize != "none":
    raise ConfigError(f"model.quantize={config.model.quantize!r} is for inference: int8 weights do not train; train "
                      "(or set train.init_from to) the float checkpoint, then `llm-jax export --quantize int8`")
  data, fsdp, tensor = resolve_mesh(config.mesh, num_devices)
  if config.mesh.mode == "pmap" and (fsdp > 1 or tensor > 1):
    raise ConfigError(f"mesh.mode=pmap is pure data parallelism, but the mesh has fsdp={fsdp} and tensor={tensor}; set "
                      "mesh.data=-1 mesh.fsdp=1 mesh.tensor=1, or mesh.mode=jit for FSDP and tensor parallelism")
  if config.data.seq_len > config.model.max_len:
    raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds model.max_len={config.model.max_len}; "
                      "lower data.seq_len or raise model.max_len")
  if config.data.seq_len <= 0:
    raise ConfigError(f"data.seq_len={config.data.seq_len}: expected a positive length")
  train = config.train
  if train.batch_size <= 0 or train.microbatches <= 0:
    raise ConfigError("train.batch_size and train.microbatches must be positive")
  if train.batch_size % train.microbatches:
    raise ConfigError(f"train.batch_size={train.batch_size} is not divisible by train.microbatches={train.microbatches}")
  shards = data * fsdp
  if (train.batch_size // train.microbatches) % shards:
    raise ConfigError(
        f"train.batch_size={train.batch_size} (per microbatch {train.batch_size // train.microbatches}) is not "
        f"divisible by mesh data x fsdp = {data} x {fsdp} = {shards}; use a multiple of {shards}")
  return data, fsdp, tensor


def replace(config: Config, **sections: Any) -> Config:
  """`dataclasses.replace` for nested sections: replace(cfg, model=dict(num_layers=2))."""
  updates = {}
  for name, values in sections.items():
    current = getattr(config, name)
    updates[name] = dataclasses.replace(current, **values) if isinstance(values, dict) else values
  return dataclasses.replace(config, **updates)

