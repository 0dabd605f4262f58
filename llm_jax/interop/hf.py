"""Hugging Face transformers weights in and out: GPT-2 and the Llama family (Llama 2/3/3.1, Mistral, Qwen2).

Our parameter names already follow HF Llama's, so the whole correspondence is one table per
naming family (`_GPT2`, `_LLAMA`): which HF tensor holds which of our parameters and how its
layout differs. Everything else (which tensors exist, their HF shapes, import, export, the
checks) is derived from that table and from our own parameter tree, so a bias that only some
configs have (GPT-2's, Qwen2's q/k/v bias) or an untied output head needs no special case.

Layouts: torch `nn.Linear` stores [out, in]; GPT-2's `Conv1D` stores [in, out] and fuses
q|k|v into one `c_attn`; our kernels are [in..., out...] with heads split out ([D, H, K],
[H, K, D]). Conversions are reshapes, transposes, splits and concatenations only, so a round
trip is bit-exact.

Memory: import reads safetensors one tensor at a time (memory-mapped) and places each into
its sharding at once; scanned layouts are filled layer by layer into a stacked array that
already lives on the devices, so the host holds one tensor, never a second copy of the model.
Export writes shard by shard (`max_shard_bytes`), so the host holds one shard at most.

Configs are translated in hf_config.py (re-exported here). Pure functions (`config_from_hf`,
`config_to_hf`, `params_from_hf`, `to_hf_state_dict`) need no checkpoint; `import_hf` / `export_hf` are what `llm-jax convert` calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import re
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import config as config_lib
from llm_jax.config import ModelConfig
from llm_jax.interop.hf_config import (SUPPORTED_ARCHITECTURES, TOKEN_KEYS, ConversionError, config_from_hf,
                                       config_to_hf, hf_model_type)
from llm_jax.model import transformer

__all__ = ["SUPPORTED_ARCHITECTURES", "ConversionError", "SafetensorsReader", "config_from_hf", "config_to_hf",
           "export_hf", "hf_model_type", "import_hf", "iter_hf_tensors", "load_hf", "params_from_hf", "read_hf_config",
           "save_hf", "to_hf_state_dict"]

Params = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# The mapping table.


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One HF tensor and the parameter(s) of ours it holds.

  `hf`: the full HF name; "{i}" marks a per-layer tensor. `ours`: dotted paths in our tree
  (relative to one block for per-layer tensors); several paths mean HF fuses them along its
  output axis (GPT-2's c_attn = q|k|v). `layout`: "same" (identical), "vector" (ours reshaped,
  e.g. a q bias [H, K] is HF's [H*K]), "linear" (torch [out, in]) or "conv1d" ([in, out]).
  `in_axes`: how many leading axes of our kernel form HF's input dimension (o_proj: [H, K] -> 2).
  """

  hf: str
  ours: tuple[str, ...]
  layout: str = "vector"
  in_axes: int = 1


def _t(hf: str, *ours: str, layout: str = "vector", in_axes: int = 1) -> _Tensor:
  return _Tensor(hf, ours, layout, in_axes)


@dataclasses.dataclass(frozen=True)
class _Family:
  """A naming family: its tensors, the prefix some checkpoints omit, and buffers to skip."""

  prefix: str  # base-model prefix; checkpoints saved from the base model (e.g. openai's gpt2) lack it
  tensors: tuple[_Tensor, ...]
  buffers: str  # regex of non-parameter tensors older checkpoints carry (causal masks, rope tables)


_GPT2 = _Family("transformer.", (
    _t("transformer.wte.weight", "embed_tokens.embedding", layout="same"),
    _t("transformer.wpe.weight", "embed_positions.embedding", layout="same"),
    _t("transformer.h.{i}.ln_1.weight", "input_layernorm.scale"),
    _t("transformer.h.{i}.ln_1.bias", "input_layernorm.bias"),
    _t("transformer.h.{i}.attn.c_attn.weight", "self_attn.q_proj.kernel", "self_attn.k_proj.kernel",
       "self_attn.v_proj.kernel", layout="conv1d"),
    _t("transformer.h.{i}.attn.c_attn.bias", "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    _t("transformer.h.{i}.attn.c_proj.weight", "self_attn.o_proj.kernel", layout="conv1d", in_axes=2),
    _t("transformer.h.{i}.attn.c_proj.bias", "self_attn.o_proj.bias"),
    _t("transformer.h.{i}.ln_2.weight", "post_attention_layernorm.scale"),
    _t("transformer.h.{i}.ln_2.bias", "post_attention_layernorm.bias"),
    _t("transformer.h.{i}.mlp.c_fc.weight", "mlp.up_proj.kernel", layout="conv1d"),
    _t("transformer.h.{i}.mlp.c_fc.bias", "mlp.up_proj.bias"),
    _t("transformer.h.{i}.mlp.c_proj.weight", "mlp.down_proj.kernel", layout="conv1d"),
    _t("transformer.h.{i}.mlp.c_proj.bias", "mlp.down_proj.bias"),
    _t("transformer.ln_f.weight", "norm.scale"),
    _t("transformer.ln_f.bias", "norm.bias"),
    _t("lm_head.weight", "lm_head.kernel", layout="linear"),
), buffers=r"\.attn\.(masked_)?bias$")

_LLAMA = _Family("model.", (
    _t("model.embed_tokens.weight", "embed_tokens.embedding", layout="same"),
    _t("model.layers.{i}.input_layernorm.weight", "input_layernorm.scale"),
    *(t for name in ("q_proj", "k_proj", "v_proj") for t in (
        _t(f"model.layers.{{i}}.self_attn.{name}.weight", f"self_attn.{name}.kernel", layout="linear"),
        _t(f"model.layers.{{i}}.self_attn.{name}.bias", f"self_attn.{name}.bias"))),  # Qwen2
    _t("model.layers.{i}.self_attn.o_proj.weight", "self_attn.o_proj.kernel", layout="linear", in_axes=2),
    _t("model.layers.{i}.post_attention_layernorm.weight", "post_attention_layernorm.scale"),
    *(_t(f"model.layers.{{i}}.mlp.{name}.weight", f"mlp.{name}.kernel", layout="linear")
      for name in ("gate_proj", "up_proj", "down_proj")),
    _t("model.norm.weight", "norm.scale"),
    _t("lm_head.weight", "lm_head.kernel", layout="linear"),
), buffers=r"\.rotary_emb\.inv_freq$")

# model_type -> naming family
_FAMILIES: dict[str, _Family] = {"gpt2": _GPT2, "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA}


HF_CONFIG_FILE = "hf_config.json"  # the imported folder's config.json, kept in the workdir


# ---------------------------------------------------------------------------------------------
# Tensors.


@dataclasses.dataclass(frozen=True)
class _Slot:
  """One HF tensor a given config has: its name, rule, layer and shapes (ours per part, HF's)."""

  name: str
  rule: _Tensor
  layer: int | None
  parts: tuple[tuple[int, ...], ...]
  shape: tuple[int, ...]


def _at(tree: Params, path: str) -> Any:
  for key in path.split("."):
    tree = tree[key]
  return tree


def _has(tree: Params, path: str) -> bool:
  try:
    _at(tree, path)
  except KeyError:
    return False
  return True


def _put(tree: Params, path: str, value: Any) -> None:
  *parents, last = path.split(".")
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[last] = value


def _fan(rule: _Tensor, shape: tuple[int, ...]) -> tuple[int, int]:
  """(fan_in, fan_out) of one part: HF's matrix dimensions, or (1, size) for a vector."""
  if rule.layout == "vector":
    return 1, math.prod(shape)
  return math.prod(shape[:rule.in_axes]), math.prod(shape[rule.in_axes:])


def _hf_shape(rule: _Tensor, parts: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
  if rule.layout == "same":
    return parts[0]
  fan_in = _fan(rule, parts[0])[0]
  fan_out = sum(_fan(rule, p)[1] for p in parts)
  return {"vector": (fan_out,), "conv1d": (fan_in, fan_out), "linear": (fan_out, fan_in)}[rule.layout]


def _family(cfg: ModelConfig) -> _Family:
  return _FAMILIES[hf_model_type(cfg)]


def _slots(cfg: ModelConfig) -> list[_Slot]:
  """Every HF tensor `cfg` has, rule by rule and layer by layer (the order import and export use).

  A rule applies when our parameter tree has its parameters: biases, lm_head and
  embed_positions exist exactly when the config says, so the table needs no conditions.
  """
  abstract = transformer.abstract_params(dataclasses.replace(cfg, scan_layers=False))
  block = abstract["layers"]["0"]
  slots = []
  for rule in _family(cfg).tensors:
    per_layer = "{i}" in rule.hf
    tree = block if per_layer else abstract
    if not all(_has(tree, path) for path in rule.ours):
      continue
    parts = tuple(tuple(_at(tree, path).shape) for path in rule.ours)
    for layer in range(cfg.num_layers) if per_layer else [None]:
      slots.append(_Slot(rule.hf.format(i=layer), rule, layer, parts, _hf_shape(rule, parts)))
  return slots


def _split_from_hf(rule: _Tensor, array: np.ndarray, parts: tuple[tuple[int, ...], ...]) -> list[np.ndarray]:
  if rule.layout == "same":
    return [array]
  sizes = [_fan(rule, p)[1] for p in parts]
  pieces = np.split(array, np.cumsum(sizes)[:-1], axis=1 if rule.layout == "conv1d" else 0)
  if rule.layout == "linear":
    pieces = [p.T for p in pieces]
  return [p.reshape(shape) for p, shape in zip(pieces, parts)]


def _join_to_hf(rule: _Tensor, arrays: list[np.ndarray]) -> np.ndarray:
  if rule.layout == "same":
    return np.ascontiguousarray(arrays[0])
  pieces = [a.reshape(_fan(rule, a.shape)) for a in arrays]  # [fan_in, fan_out]; vectors [1, n]
  joined = np.concatenate(pieces, axis=1) if len(pieces) > 1 else pieces[0]
  if rule.layout == "vector":
    joined = joined.reshape(-1)
  elif rule.layout == "linear":
    joined = joined.T
  return np.ascontiguousarray(joined)


def _canonical(name: str, family: _Family) -> str:
  return name if name.startswith(family.prefix) or name == "lm_head.weight" else family.prefix + name


def _match_names(keys: list[str], slots: list[_Slot], cfg: ModelConfig) -> dict[str, str]:
  """{HF name the config needs: key in the source}; fails naming missing and unexpected tensors."""
  family = _family(cfg)
  present = {_canonical(k, family): k for k in keys}
  needed = {slot.name for slot in slots}
  ignored = re.compile(family.buffers + (r"|^lm_head\.weight$" if cfg.tie_embeddings else ""))
  missing = sorted(needed - set(present))
  unexpected = sorted(name for name in present if name not in needed and not ignored.search(name))
  model = f"a {hf_model_type(cfg)} model with {cfg.num_layers} layers"
  if missing:
    raise ConversionError(f"{len(missing)} tensor(s) that {model} needs are missing: {_some(missing)}; "
                          "do config.json and the weights come from the same model?")
  if unexpected:
    raise ConversionError(f"{len(unexpected)} unexpected tensor(s) for {model}: {_some(unexpected)}; the weights "
                          "do not match config.json, or carry modules llm-jax does not have")
  return {name: present[name] for name in needed}


def _some(names: list[str], limit: int = 8) -> str:
  return ", ".join(names[:limit]) + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _read(tensors: Mapping[str, Any], key: str, slot: _Slot, dtype: np.dtype) -> list[np.ndarray]:
  """One HF tensor, checked, split into our parts and cast; only now is its data read."""
  tensor = tensors[key]
  if tuple(tensor.shape) != slot.shape:
    raise ConversionError(f"tensor {key} has shape {tuple(tensor.shape)}, but the config implies {slot.shape}")
  array = np.asarray(tensor)
  if not jnp.issubdtype(array.dtype, jnp.floating):
    raise ConversionError(f"tensor {key} has dtype {array.dtype}; expected a floating-point tensor "
                          "(float32, bfloat16 or float16)")
  return [part.astype(dtype, copy=False) for part in _split_from_hf(slot.rule, array, slot.parts)]


def _without_layer_axis(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
  """The sharding of one layer's slice of a stacked parameter."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
  return sharding


@functools.partial(jax.jit, donate_argnums=0)
def _write_layer(stacked: jax.Array, layer_value: jax.Array, index: jax.Array) -> jax.Array:
  """stacked[index] = layer_value in place (donated), on whatever devices `stacked` lives."""
  return jax.lax.dynamic_update_index_in_dim(stacked, layer_value, index, 0)


def params_from_hf(tensors: Mapping[str, Any], cfg: ModelConfig, shardings: Params | None = None) -> Params:
  """Our parameters (layout per cfg.scan_layers, dtype cfg.param_dtype) from HF-named tensors.

  `tensors` maps HF names to arrays: numpy arrays, or lazy tensors (`SafetensorsReader`)
  whose data is read only when converted, one at a time. `shardings` (a tree like
  `transformer.abstract_params(cfg)`, e.g. from `sharding.param_shardings`) places each
  tensor as it is read; by default everything lands on the first device. Missing and
  unexpected tensors fail, named, before any data is read; shape and dtype are checked
  tensor by tensor as they are read.
  """
  slots = _slots(cfg)
  names = _match_names(list(tensors.keys()), slots, cfg)
  dtype = jnp.dtype(cfg.param_dtype)
  abstract = transformer.abstract_params(cfg)
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  params: Params = {}
  for slot in slots:
    for path, value in zip(slot.rule.ours, _read(tensors, names[slot.name], slot, dtype)):
      if slot.layer is None:
        _put(params, path, jax.device_put(value, _at(shardings, path)))
      elif cfg.scan_layers:  # fill the stacked array on the devices, one layer at a time
        path = f"layers.{path}"
        sharding = _at(shardings, path)
        stacked = _at(params, path) if slot.layer else jnp.zeros(_at(abstract, path).shape, dtype, device=sharding)
        layer_value = jax.device_put(value, _without_layer_axis(sharding))
        _put(params, path, _write_layer(stacked, layer_value, np.int32(slot.layer)))
      else:
        path = f"layers.{slot.layer}.{path}"
        _put(params, path, jax.device_put(value, _at(shardings, path)))
  return params


def _hf_tensor(params: Params, slot: _Slot, scanned: bool) -> np.ndarray:
  def ours(path: str) -> np.ndarray:
    if slot.layer is None:
      return np.asarray(_at(params, path))
    if scanned:
      return np.asarray(_at(params, f"layers.{path}")[slot.layer])
    return np.asarray(_at(params, f"layers.{slot.layer}.{path}"))
  return _join_to_hf(slot.rule, [ours(path) for path in slot.rule.ours])


def iter_hf_tensors(params: Params, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, tensor) pairs one at a time, in HF layout and our parameters' dtype.

  Params may be scanned or unscanned whatever cfg.scan_layers says. A tied output head has
  no tensor of its own (transformers ties it to the embedding on load).
  """
  scanned = transformer.is_scanned(params)
  for slot in _slots(cfg):
    yield slot.name, _hf_tensor(params, slot, scanned)


def to_hf_state_dict(params: Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Every HF tensor at once (a second copy of the model on the host: use `save_hf` for big ones)."""
  return dict(iter_hf_tensors(params, cfg))


# ---------------------------------------------------------------------------------------------
# Folders.


class _LazyTensor:
  """One safetensors tensor: shape known, data read by np.asarray only."""

  def __init__(self, handle: Any, name: str, path: pathlib.Path):
    self._handle, self._name, self._path = handle, name, path
    self.shape = tuple(handle.get_slice(name).get_shape())

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    from safetensors import SafetensorError
    try:
      array = self._handle.get_tensor(self._name)
    except SafetensorError as e:
      raise _damaged(self._path, e) from None
    return array if dtype is None else array.astype(dtype)


def _damaged(path: pathlib.Path, error: Exception) -> ConversionError:
  reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return ConversionError(f"{path} is not a readable safetensors file ({reason}); download or save the model again")


class SafetensorsReader(Mapping[str, _LazyTensor]):
  """The tensors of a transformers folder (model.safetensors, or shards listed by the index),
  memory-mapped and read one at a time. Use as a context manager; it closes the files."""

  def __init__(self, hf_dir: str | pathlib.Path):
    from safetensors import SafetensorError, safe_open
    hf_dir = pathlib.Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
      try:
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
      except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(f"{index} is not a safetensors index ({type(e).__name__}: {e}); download or save "
                              "the model again") from None
    elif (hf_dir / "model.safetensors").is_file():
      files = ["model.safetensors"]
    else:
      raise ConversionError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json; for a "
                            "pytorch_model.bin folder, re-save it with transformers' save_pretrained first")
    self._stack = contextlib.ExitStack()
    self._where: dict[str, tuple[Any, pathlib.Path]] = {}  # tensor name: (open file, its path)
    for file in files:
      if not (hf_dir / file).is_file():
        raise ConversionError(f"{index} lists {file}, which is missing from {hf_dir}")
      try:
        handle = self._stack.enter_context(safe_open(str(hf_dir / file), framework="np"))
      except SafetensorError as e:  # a damaged header: truncated, overwritten, not safetensors at all
        self._stack.close()
        raise _damaged(hf_dir / file, e) from None
      self._where.update({name: (handle, hf_dir / file) for name in handle.keys()})

  def __getitem__(self, name: str) -> _LazyTensor:
    handle, path = self._where[name]
    return _LazyTensor(handle, name, path)

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)

  def close(self) -> None:
    self._stack.close()

  def __enter__(self) -> SafetensorsReader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_hf_config(hf_dir: str | pathlib.Path) -> dict[str, Any]:
  path = pathlib.Path(hf_dir) / "config.json"
  if not path.is_file():
    raise ConversionError(f"{path} not found; pass a local transformers model folder (config.json + safetensors)")
  try:
    raw = json.loads(path.read_text(encoding="utf-8"))
  except ValueError as e:  # JSONDecodeError or UnicodeDecodeError
    raise ConversionError(f"{path} is not JSON ({e}); pass a transformers model folder whose config.json is "
                          "intact") from None
  if not isinstance(raw, dict):
    raise ConversionError(f"{path} holds a JSON {type(raw).__name__}, not a transformers config object; pass a "
                          "transformers model folder")
  return raw


def load_hf(hf_dir: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None,
            scan_layers: bool = True) -> tuple[ModelConfig, Params]:
  """Config and parameters of a transformers folder, streamed tensor by tensor.

  With `mesh`, each tensor goes straight into its sharding (`sharding.param_shardings`).
  """
  from llm_jax import sharding as sharding_lib
  cfg = dataclasses.replace(config_from_hf(read_hf_config(hf_dir)), scan_layers=scan_layers)
  shardings = None
  if mesh is not None:
    shardings = sharding_lib.param_shardings(mesh, transformer.logical_axes(cfg), transformer.abstract_params(cfg))
  with SafetensorsReader(hf_dir) as reader:
    return cfg, params_from_hf(reader, cfg, shardings)


def save_hf(params: Params, cfg: ModelConfig, out_dir: str | pathlib.Path, *,
            extra_config: Mapping[str, Any] | None = None, max_shard_bytes: int = 2 << 30) -> pathlib.Path:
  """Writes config.json and safetensors that `AutoModelForCausalLM.from_pretrained(out_dir)` loads.

  Above `max_shard_bytes` the weights go into several files with a model.safetensors.index.json,
  and only one shard is ever held on the host. `extra_config` adds or overrides keys (token ids).
  """
  from safetensors.numpy import save_file
  out = pathlib.Path(out_dir)
  if (out / "config.json").exists() or list(out.glob("*.safetensors")):
    raise ConversionError(f"{out} already holds a model; choose an empty or new folder")
  hf_config = {**config_to_hf(cfg), **(extra_config or {})}
  scanned = transformer.is_scanned(params)
  itemsize = jnp.dtype(jax.tree.leaves(params)[0].dtype).itemsize
  shards: list[list[_Slot]] = [[]]
  size = 0
  for slot in _slots(cfg):
    nbytes = math.prod(slot.shape) * itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(slot)
    size += nbytes
  out.mkdir(parents=True, exist_ok=True)
  files = ["model.safetensors"] if len(shards) == 1 else [
      f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
  weight_map, total = {}, 0
  for file, shard in zip(files, shards):
    tensors = {slot.name: _hf_tensor(params, slot, scanned) for slot in shard}
    total += sum(t.nbytes for t in tensors.values())
    save_file(tensors, str(out / file), metadata={"format": "pt"})
    _as_created(out / file)
    weight_map.update({name: file for name in tensors})
    del tensors
  if len(files) > 1:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
  (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
  return out


def _umask() -> int:
  """This process's umask, read without changing it where Linux allows (os.umask alone must set one)."""
  with contextlib.suppress(OSError, StopIteration, ValueError):
    status = pathlib.Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8)
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _as_created(path: pathlib.Path) -> None:
  """Gives a file the mode an ordinary new file gets (0666 less the umask).

  safetensors' save_file writes through a private temporary file and renames it, leaving
  mode 0600: other users (a serving account, a shared cache) could not read the export.
  """
  os.chmod(path, 0o666 & ~_umask())


def _hf_tokenizer_spec(hf_dir: pathlib.Path, out: pathlib.Path, model_vocab_size: int) -> str | None:
  """The `data.tokenizer` of an import, after checking the folder's tokenizer fits the model.

  A Hugging Face tokenizer.json wins over a tokenizer.model beside it (as in transformers, whose fast
  tokenizer reads it); a folder with only tokenizer.model keeps it, as before. Checked before any
  weight is read, so a broken or foreign tokenizer stops the import with nothing written.
  """
  from llm_jax.data import hf_tokenizer
  from llm_jax.data import tokenizer as tokenizer_lib
  if (hf_dir / hf_tokenizer.TOKENIZER_JSON).is_file():
    tok = tokenizer_lib.load_tokenizer(str(hf_dir / hf_tokenizer.TOKENIZER_JSON))
    if isinstance(tok, hf_tokenizer.HFTokenizer):
      if tok.vocab_size > model_vocab_size:
        raise ConversionError(f"{hf_dir}'s tokenizer has {tok.vocab_size} tokens (added ones included) but its "
                              f"config.json vocab_size is {model_vocab_size}; the tokenizer belongs to another model: "
                              "convert a folder whose tokenizer.json fits its model")
      return str(out / hf_tokenizer.TOKENIZER_JSON)
  if (hf_dir / "tokenizer.model").is_file():
    return str(out / "tokenizer.model")
  return None


def import_hf(hf_dir: str | pathlib.Path, out_workdir: str | pathlib.Path) -> str:
  """`llm-jax convert --from-hf DIR --out WORKDIR`: a parameters-only checkpoint of a transformers folder.

  The workdir is what `llm_jax.load`, `llm-jax generate` and `train.init_from` read. The tokenizer
  comes along as it is: tokenizer.json, tokenizer_config.json, special_tokens_map.json and
  chat_template.jinja, and a sentencepiece tokenizer.model; the folder's config.json is kept as
  hf_config.json so an export restores its token ids.
  """
  from llm_jax import checkpoint, workdir
  from llm_jax.data import hf_tokenizer
  hf_dir, out = pathlib.Path(hf_dir), pathlib.Path(out_workdir).absolute()
  workdir.refuse_run_folder(out, "convert --from-hf")
  hf_config = read_hf_config(hf_dir)
  tokenizer = _hf_tokenizer_spec(hf_dir, out, config_from_hf(hf_config).vocab_size)
  model_cfg, params = load_hf(hf_dir)
  data = config_lib.DataConfig()
  data = dataclasses.replace(data, seq_len=min(data.seq_len, model_cfg.max_len), tokenizer=tokenizer or data.tokenizer)
  written = checkpoint.save_params(out, params, config_lib.Config(model=model_cfg, data=data))
  if (hf_dir / "tokenizer.model").is_file():
    shutil.copy(hf_dir / "tokenizer.model", written / "tokenizer.model")
  hf_tokenizer.copy_files(hf_dir, written)
  (written / HF_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True))
  return str(written)


def export_hf(workdir: str | pathlib.Path, out_dir: str | pathlib.Path) -> str:
  """`llm-jax convert --to-hf WORKDIR --out DIR`: the latest parameters as a transformers folder.

  Reads parameters and config the way `llm_jax.load` does, but without building a tokenizer:
  export only copies the tokenizer files (a tokenizer.model may be a foreign sentencepiece model,
  e.g. Llama 2's, that llm-jax's tokenizer does not accept), and a Hugging Face tokenizer's
  files only when the workdir's tokenizer.json is one (llm-jax's own would not load in
  transformers). Token ids come from the workdir's hf_config.json when it was imported.
  """
  from llm_jax import checkpoint
  from llm_jax import workdir as workdir_lib
  from llm_jax.data import hf_tokenizer
  workdir = pathlib.Path(workdir)
  workdir_lib.refuse_run_folder(out_dir, "convert --to-hf")
  if checkpoint.find_params(workdir)[1].model.quantize != "none":
    raise checkpoint.CheckpointError(f"{workdir} holds int8 weights, which transformers' checkpoints do not; convert "
                                     "the float checkpoint it was exported from")
  params, config = checkpoint.restore_params(workdir)
  source = workdir / HF_CONFIG_FILE
  extra = {}
  if source.is_file():
    extra = {k: v for k, v in json.loads(source.read_text()).items() if k in TOKEN_KEYS}
  out = save_hf(params, config.model, out_dir, extra_config=extra)
  if (workdir / "tokenizer.model").is_file():
    shutil.copy(workdir / "tokenizer.model", out / "tokenizer.model")
  hf_tokenizer.copy_files(workdir, out)
  return str(out)
