"""Hugging Face interop, proven against transformers (PyTorch, float32, eager attention).

Tiny random models are built locally from transformers configs (no download): every parameter
is perturbed, so no bias is zero and no norm scale is one, and a wrong mapping cannot hide.
Each architecture is checked for logits, greedy generation, loss and gradients, and exact
round trips in both directions.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest


from hf_extra import hf_extra  # noqa: E402  (tests/hf_extra.py)

torch = hf_extra("torch")
transformers = hf_extra("transformers")
safetensors_numpy = hf_extra("safetensors.numpy")

import llm_jax  # noqa: E402
from llm_jax import config as config_lib  # noqa: E402
from llm_jax import sharding  # noqa: E402
from llm_jax.interop import hf  # noqa: E402
from llm_jax.model import transformer  # noqa: E402
from llm_jax.train import losses  # noqa: E402

TOL = 1e-4
NO_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA_SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, **NO_TOKENS)
CASES = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                            **NO_TOKENS),
    "llama_gqa": lambda: transformers.LlamaConfig(**LLAMA_SIZES),
    "llama31": lambda: transformers.LlamaConfig(**LLAMA_SIZES, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    "mistral": lambda: transformers.MistralConfig(**LLAMA_SIZES, sliding_window=8),
    "qwen2": lambda: transformers.Qwen2Config(**LLAMA_SIZES, tie_word_embeddings=True, use_sliding_window=True,
                                              sliding_window=8, max_window_layers=0),
}
# A field each case's parity depends on: with it changed, our logits must move away from HF's,
# so the tests above cannot pass by ignoring it.
MUST_MATTER = {"llama31": {"rope_scaling": "none"}, "mistral": {"sliding_window": 0}, "qwen2": {"sliding_window": 0}}


def random_hf_model(hf_config, seed: int = 0):
  """A transformers model in eval mode with every parameter perturbed away from its init."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager", dtype=torch.float32)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def hf_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def random_tokens(shape, vocab, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def perturbed(params, seed=0):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


forward = jax.jit(transformer.forward, static_argnums=1)


@dataclasses.dataclass
class Case:
  name: str
  hf_dir: pathlib.Path
  torch_model: object
  cfg: config_lib.ModelConfig
  params: dict


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory) -> Case:
  """A saved random transformers model of one architecture and its import (scanned)."""
  hf_dir = tmp_path_factory.mktemp(request.param)
  model = random_hf_model(CASES[request.param](), seed=len(request.param))
  model.save_pretrained(hf_dir)
  cfg, params = hf.load_hf(hf_dir)
  return Case(request.param, hf_dir, model, cfg, params)


def test_logits_match_transformers(case):
  tokens = random_tokens((3, 40), case.cfg.vocab_size)
  expected = hf_logits(case.torch_model, tokens)
  diff = np.abs(np.asarray(forward(case.params, case.cfg, tokens)) - expected).max()
  print(f"{case.name}: max |logits - transformers| = {diff:.2e}")
  assert diff < TOL
  if case.name in MUST_MATTER:
    wrong = dataclasses.replace(case.cfg, **MUST_MATTER[case.name])
    assert np.abs(np.asarray(forward(case.params, wrong, tokens)) - expected).max() > 100 * TOL


def greedy(params, cfg, prompt_BP: np.ndarray, steps: int) -> np.ndarray:
  """Plain greedy decoding over the full forward pass (one compile: a fixed-length buffer)."""
  batch, length = prompt_BP.shape
  tokens = np.zeros((batch, length + steps), np.int32)
  tokens[:, :length] = prompt_BP
  for t in range(length, length + steps):
    logits = forward(params, cfg, tokens)
    tokens[:, t] = np.asarray(jnp.argmax(logits[:, t - 1], axis=-1))
  return tokens[:, length:]


def test_greedy_generation_matches_transformers(case):
  prompt = random_tokens((2, 8), case.cfg.vocab_size, seed=1)
  prompt_ids = torch.tensor(prompt, dtype=torch.long)
  with torch.no_grad():
    out = case.torch_model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=32,
                                    do_sample=False)
  expected = out[:, prompt.shape[1]:].numpy()
  assert expected.shape == (2, 32)
  np.testing.assert_array_equal(greedy(case.params, case.cfg, prompt, 32), expected)


def test_loss_and_gradients_match_transformers(case):
  tokens = random_tokens((2, 33), case.cfg.vocab_size, seed=2)
  model = case.torch_model
  model.zero_grad()
  loss = model(input_ids=torch.tensor(tokens, dtype=torch.long), labels=torch.tensor(tokens, dtype=torch.long)).loss
  loss.backward()
  theirs = {name: p.grad.numpy() for name, p in model.named_parameters()}

  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  batch = {"inputs": inputs, "targets": targets, "segment_ids": np.ones_like(inputs),
           "positions": np.broadcast_to(np.arange(inputs.shape[1], dtype=np.int32), inputs.shape),
           "loss_mask": np.ones(inputs.shape, np.float32)}
  def mean_loss(params):
    total, sums = losses.lm_loss(params, batch, None, model=case.cfg)
    return total / sums["count"]

  ours_loss, grads = jax.jit(jax.value_and_grad(mean_loss))(case.params)
  assert abs(float(ours_loss) - loss.item()) < 1e-5 * loss.item()
  ours = hf.to_hf_state_dict(grads, case.cfg)
  assert sorted(ours) == sorted(theirs)
  worst = max(np.linalg.norm(ours[n] - theirs[n]) / np.linalg.norm(theirs[n]) for n in theirs)
  print(f"{case.name}: loss {float(ours_loss):.6f} vs {loss.item():.6f}; worst relative gradient error {worst:.2e}")
  assert worst < TOL


def test_round_trip_hf_ours_hf_is_exact(case):
  original = safetensors_numpy.load_file(case.hf_dir / "model.safetensors")
  exported = hf.to_hf_state_dict(case.params, case.cfg)
  assert sorted(exported) == sorted(original)
  for name, tensor in original.items():
    assert exported[name].dtype == tensor.dtype and exported[name].shape == tensor.shape, name
    np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
  assert hf.config_from_hf(hf.config_to_hf(case.cfg)) == case.cfg


def test_ours_to_hf_to_transformers(case, tmp_path):
  """Fresh (perturbed) parameters of ours, unscanned, exported: transformers computes our logits."""
  params = transformer.unstack_layers(perturbed(transformer.init_params(case.cfg, jax.random.key(3))))
  cfg = dataclasses.replace(case.cfg, scan_layers=False)
  hf.save_hf(params, cfg, tmp_path / "out")
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "out", attn_implementation="eager", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  tokens = random_tokens((2, 40), cfg.vocab_size, seed=4)
  diff = np.abs(np.asarray(forward(params, cfg, tokens)) - hf_logits(model.eval(), tokens)).max()
  assert diff < TOL


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> pathlib.Path:
  hf_dir = tmp_path_factory.mktemp("llama")
  random_hf_model(CASES["llama_gqa"]()).save_pretrained(hf_dir)
  return hf_dir


def test_import_places_each_tensor_in_its_sharding(llama_dir):
  cfg, plain = hf.load_hf(llama_dir)
  mesh = sharding.make_mesh(config_lib.MeshConfig(data=1, fsdp=4, tensor=2))
  _, placed = hf.load_hf(llama_dir, mesh=mesh)
  expected = sharding.param_shardings(mesh, transformer.logical_axes(cfg), transformer.abstract_params(cfg))
  for (path, x), want, y in zip(jax.tree.leaves_with_path(placed), jax.tree.leaves(expected), jax.tree.leaves(plain)):
    assert x.sharding.is_equivalent_to(want, x.ndim), jax.tree_util.keystr(path)
    np.testing.assert_array_equal(x, y)
  assert placed["layers"]["mlp"]["up_proj"]["kernel"].addressable_shards[0].data.shape == (2, 16, 64)
  _, unscanned = hf.load_hf(llama_dir, scan_layers=False)
  jax.tree.map(np.testing.assert_array_equal, unscanned, transformer.unstack_layers(plain))


def test_import_and_export_stream_tensor_by_tensor(tmp_path):
  """Host memory during conversion stays near one tensor (import) or one shard (export), far below the model.

  tracemalloc sees numpy buffers, not XLA's; a first conversion compiles, so the second is measured.
  """
  hf_config = transformers.LlamaConfig(**{**LLAMA_SIZES, "vocab_size": 1024, "hidden_size": 256,
                                          "intermediate_size": 512, "num_hidden_layers": 8})
  random_hf_model(hf_config).save_pretrained(tmp_path / "hf")
  cfg = hf.config_from_hf(hf.read_hf_config(tmp_path / "hf"))
  total = sum(x.size * 4 for x in jax.tree.leaves(transformer.abstract_params(cfg)))
  largest = 4 * cfg.vocab_size * cfg.d_model
  shard = 2 * largest
  for attempt in ("warm-up", "measured"):
    tracemalloc.start()
    with hf.SafetensorsReader(tmp_path / "hf") as reader:
      params = hf.params_from_hf(reader, cfg)
    _, import_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    hf.save_hf(params, cfg, tmp_path / attempt, max_shard_bytes=shard)
    _, export_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
  print(f"model {total} B, largest tensor {largest} B, import peak {import_peak} B, export peak {export_peak} B")
  assert import_peak < 4 * largest < total / 5  # a linear weight and its transpose, plus interpreter noise
  assert export_peak < shard + 4 * largest < total / 3
  index = json.loads((tmp_path / "measured" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 3
  # The sharded folder reads back to the same parameters, and transformers loads it.
  _, again = hf.load_hf(tmp_path / "measured")
  jax.tree.map(np.testing.assert_array_equal, again, params)
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "measured", attn_implementation="eager")
  tokens = random_tokens((1, 16), cfg.vocab_size)
  assert np.abs(np.asarray(forward(params, cfg, tokens)) - hf_logits(model.eval(), tokens)).max() < TOL


def test_bfloat16_checkpoint_round_trips_bit_exactly(tmp_path):
  model = random_hf_model(CASES["gpt2"]()).to(torch.bfloat16)
  model.save_pretrained(tmp_path)
  cfg, params = hf.load_hf(tmp_path)
  assert cfg.param_dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  original = safetensors_numpy.load_file(tmp_path / "model.safetensors")
  exported = hf.to_hf_state_dict(params, cfg)
  for name, tensor in original.items():
    np.testing.assert_array_equal(exported[name].view(np.uint16), tensor.view(np.uint16), err_msg=name)


def test_openai_gpt2_layout_without_prefix_and_with_mask_buffers(tmp_path):
  """openai-community/gpt2 was saved from GPT2Model: no "transformer." prefix, causal-mask buffers.

  Some checkpoints also store the tied head beside the embedding; transformers ties it on load.
  """
  model = random_hf_model(CASES["gpt2"]())
  model.save_pretrained(tmp_path / "hf")
  tensors = safetensors_numpy.load_file(tmp_path / "hf" / "model.safetensors")
  tensors = {name.removeprefix("transformer."): t for name, t in tensors.items()}
  tensors.update({f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 64, 64), np.float32)) for i in range(2)})
  tensors["lm_head.weight"] = tensors["wte.weight"]
  cfg = hf.config_from_hf(hf.read_hf_config(tmp_path / "hf"))
  params = hf.params_from_hf(tensors, cfg)
  tokens = random_tokens((2, 16), cfg.vocab_size)
  assert np.abs(np.asarray(forward(params, cfg, tokens)) - hf_logits(model, tokens)).max() < TOL


# ---- bad input


@pytest.fixture(scope="module")
def llama_tensors(llama_dir):
  return hf.config_from_hf(hf.read_hf_config(llama_dir)), safetensors_numpy.load_file(llama_dir / "model.safetensors")


def test_unsupported_architecture_lists_the_supported_ones():
  with pytest.raises(hf.ConversionError, match=r"'bert'.*supported: gpt2, llama, mistral, qwen2"):
    hf.config_from_hf(transformers.BertConfig().to_dict())


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type='yarn'"),
    ({"attention_bias": True}, "attention_bias or mlp_bias"),
    ({"mlp_bias": True}, "attention_bias or mlp_bias"),
])
def test_unsupported_options_are_named(change, message):
  with pytest.raises(hf.ConversionError, match=message):
    hf.config_from_hf({**transformers.LlamaConfig(**LLAMA_SIZES).to_dict(), **change})


def test_qwen2_mixing_full_and_sliding_layers_is_refused():
  hf_config = transformers.Qwen2Config(**LLAMA_SIZES, use_sliding_window=True, sliding_window=8, max_window_layers=1)
  with pytest.raises(hf.ConversionError, match="full_attention.*sliding_attention"):
    hf.config_from_hf(hf_config.to_dict())
  every_layer = transformers.Qwen2Config(**LLAMA_SIZES, use_sliding_window=True, sliding_window=8, max_window_layers=0)
  assert hf.config_from_hf(every_layer.to_dict()).sliding_window == 8


def test_legacy_rope_keys_of_transformers_4():
  legacy = {**transformers.LlamaConfig(**LLAMA_SIZES).to_dict(), "rope_theta": 500000.0, "rope_parameters": None,
            "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}}
  cfg = hf.config_from_hf(legacy)
  assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_original_max_len) == (500000.0, "llama3", 8192)


def test_missing_tensor_is_named(llama_tensors):
  cfg, tensors = llama_tensors
  partial = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
  with pytest.raises(hf.ConversionError, match=r"1 tensor\(s\).*missing: model\.layers\.1\.mlp\.up_proj\.weight"):
    hf.params_from_hf(partial, cfg)


def test_unexpected_tensor_is_named(llama_tensors):
  cfg, tensors = llama_tensors
  extra = {**tensors, "model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)}
  with pytest.raises(hf.ConversionError, match=r"unexpected tensor\(s\).*model\.layers\.0\.self_attn\.q_norm\.weight"):
    hf.params_from_hf(extra, cfg)


def test_shape_mismatch_is_named(llama_tensors):
  cfg, tensors = llama_tensors
  wrong = {**tensors, "model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}
  with pytest.raises(hf.ConversionError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(64, 64\).*"
                                               r"\(32, 64\)"):
    hf.params_from_hf(wrong, cfg)


def test_dtype_mismatch_is_named(llama_tensors):
  cfg, tensors = llama_tensors
  wrong = {**tensors, "model.norm.weight": np.ones(64, np.int32)}
  with pytest.raises(hf.ConversionError, match=r"model\.norm\.weight has dtype int32"):
    hf.params_from_hf(wrong, cfg)


@pytest.mark.parametrize("fields", [dict(position="rope", norm="layernorm", mlp="gelu"),
                                    dict(position="rope", norm="rmsnorm", mlp="swiglu", use_bias=True),
                                    dict(num_kv_heads=2)])
def test_inexpressible_model_is_refused(fields):
  with pytest.raises(hf.ConversionError, match="no transformers equivalent"):
    hf.config_to_hf(config_lib.ModelConfig(**fields))


def test_folder_without_safetensors(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(transformers.LlamaConfig(**LLAMA_SIZES).to_dict()))
  with pytest.raises(hf.ConversionError, match="no model.safetensors"):
    hf.load_hf(tmp_path)


# ---- workdirs and the CLI


def convert(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "llm_jax", "convert", *args], capture_output=True, text=True)


def test_cli_convert_in_and_out(tmp_path):
  hf_config = transformers.LlamaConfig(**{**LLAMA_SIZES, "bos_token_id": 1, "eos_token_id": 2})
  model = random_hf_model(hf_config)
  model.save_pretrained(tmp_path / "hf")
  result = convert("--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "work"))
  assert result.returncode == 0, result.stderr
  assert (tmp_path / "work" / "params").is_dir()

  loaded = llm_jax.load(tmp_path / "work")
  tokens = random_tokens((2, 20), 256)
  assert np.abs(loaded.logits(tokens) - hf_logits(model, tokens)).max() < TOL

  result = convert("--to-hf", str(tmp_path / "work"), "--out", str(tmp_path / "back"))
  assert result.returncode == 0, result.stderr
  original = safetensors_numpy.load_file(tmp_path / "hf" / "model.safetensors")
  exported = safetensors_numpy.load_file(tmp_path / "back" / "model.safetensors")
  assert sorted(original) == sorted(exported)
  for name in original:
    np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
  back = json.loads((tmp_path / "back" / "config.json").read_text())
  assert (back["bos_token_id"], back["eos_token_id"]) == (1, 2)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager")
  np.testing.assert_array_equal(hf_logits(reloaded.eval(), tokens), hf_logits(model, tokens))

  result = convert("--to-hf", str(tmp_path / "work"), "--out", str(tmp_path / "back"))
  assert result.returncode == 2 and "already holds a model" in result.stderr


def test_cli_convert_refuses_unsupported_architecture(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
  result = convert("--from-hf", str(tmp_path), "--out", str(tmp_path / "work"))
  assert result.returncode == 2
  assert "gpt_neox" in result.stderr and "supported: gpt2, llama, mistral, qwen2" in result.stderr


def hf_folder_with_tokenizer(tmp_path, llama_dir, model_file) -> pathlib.Path:
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  for file in llama_dir.iterdir():
    (hf_dir / file.name).write_bytes(file.read_bytes())
  (hf_dir / "tokenizer.model").write_bytes(model_file.read_bytes())
  return hf_dir


def test_import_brings_an_llm_jax_sentencepiece_tokenizer(tmp_path, llama_dir):
  from llm_jax.data import tokenizer
  (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog 12\n" * 50)
  model_file = tokenizer.train_sentencepiece([str(tmp_path / "text.txt")], 300, str(tmp_path / "sp.model"))
  out = pathlib.Path(hf.import_hf(hf_folder_with_tokenizer(tmp_path, llama_dir, model_file), tmp_path / "work"))
  assert (out / "tokenizer.model").read_bytes() == model_file.read_bytes()
  saved = config_lib.load_json(out / "config.json")
  assert saved.data.tokenizer == str(out / "tokenizer.model")
  loaded = llm_jax.load(out)
  assert loaded.tokenizer.decode(loaded.tokenizer.encode("the lazy fox")) == "the lazy fox"


def test_foreign_sentencepiece_tokenizer_travels_both_ways(tmp_path, llama_dir):
  """Llama 2's tokenizer.model (unk 0, bos 1, eos 2, no pad) is copied in and out byte for byte."""
  import sentencepiece as spm
  (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50)
  spm.SentencePieceTrainer.train(input=str(tmp_path / "text.txt"), model_prefix=str(tmp_path / "llama2"),
                                 vocab_size=30, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
  model_file = tmp_path / "llama2.model"
  out = hf.import_hf(hf_folder_with_tokenizer(tmp_path, llama_dir, model_file), tmp_path / "work")
  back = pathlib.Path(hf.export_hf(out, tmp_path / "back"))
  assert (back / "tokenizer.model").read_bytes() == model_file.read_bytes()
  # The imported workdir loads with that tokenizer's own ids and generates what greedy decoding gives.
  loaded = llm_jax.load(out)
  assert (loaded.tokenizer.unk_id, loaded.tokenizer.bos_id, loaded.tokenizer.eos_id) == (0, 1, 2)
  detail = loaded.generate(["the quick"], max_new_tokens=6, return_details=True)[0]
  prompt = np.asarray([loaded.tokenizer.encode("the quick")], np.int32)
  expected = greedy(loaded.params, loaded.config.model, prompt, 6)[0].tolist()
  assert detail["token_ids"] == expected[:len(detail["token_ids"])]
  assert len(detail["token_ids"]) == 6 or detail["token_ids"][-1] == 2


def test_fine_tune_an_imported_model_through_the_cli(tmp_path, llama_dir):
  """`train.init_from` takes an imported workdir: one step at learning rate 0 keeps its weights."""
  work = tmp_path / "work"
  assert convert("--from-hf", str(llama_dir), "--out", str(work)).returncode == 0
  (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 400)
  import sentencepiece as spm  # a 30-piece tokenizer fits the imported model's 256-entry vocabulary
  spm.SentencePieceTrainer.train(input=str(tmp_path / "text.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=30,
                                 minloglevel=2)
  result = subprocess.run(
      [sys.executable, "-m", "llm_jax", "train", "--config", str(work / "config.json"), "--workdir",
       str(tmp_path / "tuned"), f"train.init_from={work}", f"data.source=text:{tmp_path / 'text.txt'}",
       f"data.tokenizer={tmp_path / 'sp.model'}", "train.steps=1", "train.batch_size=8", "train.eval_every=0", "optim.learning_rate=0",
       "optim.warmup_steps=0"], capture_output=True, text=True, env={**os.environ, "CI": "true"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"starting from the parameters of {work}" in result.stdout
  jax.tree.map(np.testing.assert_array_equal, llm_jax.load(tmp_path / "tuned").params, llm_jax.load(work).params)
