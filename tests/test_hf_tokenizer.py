"""Hugging Face tokenizers, proven against transformers' own reading of the same folder.

Tokenizers are trained here with the `tokenizers` library on the paragraphs below and saved through
`transformers.PreTrainedTokenizerFast.save_pretrained`, so each folder holds exactly the files
transformers writes (nothing downloads). A tiny random Llama saved beside one of them is converted
and generates text through `llm_jax.load` and the real CLI.
"""

import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from hf_extra import hf_extra  # noqa: E402  (tests/hf_extra.py)

torch = hf_extra("torch")
transformers = hf_extra("transformers")

import llm_jax  # noqa: E402
from llm_jax import config as config_lib  # noqa: E402
from llm_jax.data import hf_tokenizer  # noqa: E402
from llm_jax.data import tokenizer as tok_lib  # noqa: E402
from llm_jax.data.tokenizer import TokenizerError  # noqa: E402
from llm_jax.interop import hf  # noqa: E402

ENGLISH = """It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of
foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was
the season of Darkness, it was the spring of hope, it was the winter of despair.

The quick brown fox jumps over the lazy dog. A training run reads its data, takes a step, and writes a
checkpoint; the tokenizer turns each document into ids, and the model learns to predict the next one.
Numbers such as 1234 and 56.78 appear too, with punctuation: commas, semicolons; and "quotes".
"""
CHINESE = """天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。寒来暑往，秋收冬藏。
学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？
今天的天气很好，我们一起去公园散步，看看湖边的花和树。模型读取文本，把每个字变成编号。
"""
HELD_OUT = {  # text the tokenizers never saw in training (byte-level BPE still covers every byte)
    "held_out_english": "Wisdom and foolishness, hope and despair: the model predicts each next token.\n",
    "held_out_chinese": "西游记讲的是唐僧师徒四人去西天取经的故事，一路上降妖除魔。",
    "mixed": "naïve café — 東京 😀 <|im_start|>user\nHi<|im_end|>\n  two  spaces\tand a tab",
}
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def byte_level_bpe(vocab_size: int = 400) -> tokenizers.Tokenizer:
  """Llama 3 / Qwen2 / GPT-2 style: byte-level BPE, a post-processor that prepends bos, chat tokens added."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([ENGLISH, CHINESE], trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
  tok.add_special_tokens(CHAT_TOKENS)
  return tok


def metaspace_bpe() -> tokenizers.Tokenizer:
  """Mistral / Llama 2 style: "▁" for spaces, <unk> <s> </s> <pad> as ids 0-3."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
  tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
  tok.train_from_iterator([ENGLISH, CHINESE], trainers.BpeTrainer(
      vocab_size=500, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False))
  return tok


def save_pretrained(tok: tokenizers.Tokenizer, folder: pathlib.Path, **specials) -> pathlib.Path:
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=TEMPLATE, **specials).save_pretrained(folder)
  return folder


FLAVOURS = {
    "byte_level": lambda folder: save_pretrained(byte_level_bpe(), folder, bos_token=BOS, eos_token=EOS),
    "metaspace": lambda folder: save_pretrained(metaspace_bpe(), folder, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>"),
}


@pytest.fixture(scope="module", params=list(FLAVOURS))
def folder(request, tmp_path_factory) -> pathlib.Path:
  return FLAVOURS[request.param](tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def byte_folder(tmp_path_factory) -> pathlib.Path:
  return FLAVOURS["byte_level"](tmp_path_factory.mktemp("byte_level"))


def texts_for(folder: pathlib.Path) -> dict[str, str]:
  """Held-out text where the tokenizer covers every byte; the training text where unseen characters are <unk>."""
  if folder.name.startswith("byte_level"):
    return {"english": ENGLISH, "chinese": CHINESE, **HELD_OUT}
  return {"english": ENGLISH, "chinese": CHINESE}


def one_line(excinfo) -> str:
  message = str(excinfo.value)
  assert "\n" not in message, message
  return message


# ---- the tokenizer against transformers


def test_transformers_writes_what_we_read(byte_folder):
  """The files of this transformers version; older ones also wrote special_tokens_map.json (tested below)."""
  assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in byte_folder.iterdir()}


def test_ids_match_transformers_and_decode_back(folder):
  ours = tok_lib.load_tokenizer(str(folder))
  auto = transformers.AutoTokenizer.from_pretrained(folder)
  assert isinstance(ours, hf_tokenizer.HFTokenizer)
  for kind, text in texts_for(folder).items():
    ids = ours.encode(text)
    assert ids == auto(text, add_special_tokens=False).input_ids, kind
    if kind in ("english", "chinese"):  # the training text: real merges, not one id per byte (or character)
      assert len(ids) < 0.8 * min(len(text.encode("utf-8")), len(text) if kind == "english" else 10**9), kind
    assert ours.decode(ids) == text, kind
    assert [a.tolist() for a in ours.encode_batch([text, text[:20]])] == [ids, ours.encode(text[:20])]
  if folder.name.startswith("byte_level"):
    assert ours.encode("<|im_start|>") == [auto.convert_tokens_to_ids("<|im_start|>")]  # added tokens in text


def test_specials_and_vocab_size_match_transformers(folder):
  ours = tok_lib.load_tokenizer(str(folder / "tokenizer.json"))
  auto = transformers.AutoTokenizer.from_pretrained(folder)
  assert (ours.bos_id, ours.eos_id) == (auto.bos_token_id, auto.eos_token_id)
  assert ours.vocab_size == len(auto)
  if folder.name.startswith("metaspace"):
    assert (ours.unk_id, ours.pad_id) == (auto.unk_token_id, auto.pad_token_id) == (0, 3)
  else:  # no pad or unk named: pad with eos; byte-level BPE has no unk
    assert auto.pad_token_id is None and auto.unk_token_id is None
    assert (ours.pad_id, ours.unk_id) == (ours.eos_id, -1)
    assert ours.vocab_size == 402  # 400 trained + the two chat tokens


def test_chat_template_equals_transformers(folder):
  assert tok_lib.load_tokenizer(str(folder)).chat_template == transformers.AutoTokenizer.from_pretrained(
      folder).chat_template == TEMPLATE
  assert tok_lib.ByteTokenizer().chat_template is None


def test_encode_adds_no_bos_and_decode_drops_only_framing(byte_folder):
  ours = tok_lib.load_tokenizer(str(byte_folder))
  auto = transformers.AutoTokenizer.from_pretrained(byte_folder)
  assert auto("Hi").input_ids[0] == ours.bos_id  # transformers' post-processor prepends bos by default ...
  assert ours.encode("Hi") == auto("Hi").input_ids[1:]  # ... ours never does: the pipeline frames documents
  start, end = ours.encode("<|im_start|>")[0], ours.encode("<|im_end|>")[0]
  hi = ours.encode("Hi")
  # bos, eos and ids past the vocabulary are dropped; chat markers are text the model wrote and stay.
  assert ours.decode([ours.bos_id, start, *hi, end, ours.eos_id, ours.vocab_size, 10**6]) == "<|im_start|>Hi<|im_end|>"


def test_legacy_folder_with_special_tokens_map(byte_folder, tmp_path):
  """transformers 4's layout: the template inside tokenizer_config.json, AddedToken dicts, special_tokens_map.json.

  Where the two files disagree, special_tokens_map.json wins in transformers, and here too.
  """
  legacy = tmp_path / "legacy"
  legacy.mkdir()
  shutil.copy(byte_folder / "tokenizer.json", legacy / "tokenizer.json")
  added_token = {"__type": "AddedToken", "content": BOS, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False}
  config = {"bos_token": added_token, "eos_token": EOS, "chat_template": "{{ messages[0]['content'] }}",
            "tokenizer_class": "PreTrainedTokenizerFast"}
  (legacy / "tokenizer_config.json").write_text(json.dumps(config))
  (legacy / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
  ours = tok_lib.load_tokenizer(str(legacy))
  auto = transformers.AutoTokenizer.from_pretrained(legacy)
  assert (ours.bos_id, ours.eos_id) == (auto.bos_token_id, auto.eos_token_id) == (0, 401)
  assert ours.chat_template == auto.chat_template == "{{ messages[0]['content'] }}"


def test_truncation_stored_in_tokenizer_json_is_ignored(tmp_path):
  tok = byte_level_bpe()
  full = tok.encode(ENGLISH, add_special_tokens=False).ids
  tok.enable_truncation(max_length=8)
  ours = tok_lib.load_tokenizer(str(save_pretrained(tok, tmp_path / "truncating", bos_token=BOS, eos_token=EOS)))
  assert len(full) > 100 and ours.encode(ENGLISH) == full  # a document is never cut silently
  assert ours.encode_batch([ENGLISH])[0].tolist() == full


def test_pickles_into_data_workers(byte_folder):
  ours = tok_lib.load_tokenizer(str(byte_folder))
  clone = pickle.loads(pickle.dumps(ours))
  assert clone.encode(HELD_OUT["held_out_chinese"]) == ours.encode(HELD_OUT["held_out_chinese"])
  assert (clone.eos_id, clone.chat_template) == (ours.eos_id, ours.chat_template)


# ---- workdirs


def test_load_from_workdir_round_trips(byte_folder, tmp_path):
  ours = tok_lib.load_tokenizer(str(byte_folder))
  work = tmp_path / "run"
  assert ours.save(work) == work / "tokenizer.json"
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (work / name).read_bytes() == (byte_folder / name).read_bytes(), name
  back = tok_lib.load_from_workdir(work)
  assert isinstance(back, hf_tokenizer.HFTokenizer)
  assert back.encode(HELD_OUT["mixed"]) == ours.encode(HELD_OUT["mixed"])
  assert (back.bos_id, back.eos_id, back.vocab_size, back.chat_template) == (0, 1, 402, TEMPLATE)

  # A byte run saved over it is a byte run (llm-jax's tokenizer.json marker decides), and the reverse.
  tok_lib.ByteTokenizer().save(work)
  assert isinstance(tok_lib.load_from_workdir(work), tok_lib.ByteTokenizer)
  ours.save(work)
  assert tok_lib.load_from_workdir(work).encode("Hi") == ours.encode("Hi")


def test_bare_tokenizer_json_guesses_eos_and_saves_a_config(byte_folder, tmp_path):
  """A tokenizer.json alone: eos is its special <|end_of_text|>; save writes a config transformers reads."""
  bare = tmp_path / "bare"
  bare.mkdir()
  shutil.copy(byte_folder / "tokenizer.json", bare / "tokenizer.json")
  ours = tok_lib.load_tokenizer(str(bare / "tokenizer.json"))
  assert (ours.eos_id, ours.bos_id, ours.chat_template) == (1, 1, None)  # no bos named: begin with eos
  # A stale special_tokens_map.json or template in the workdir would shadow this tokenizer's: save removes them.
  work = tmp_path / "work"
  work.mkdir()
  (work / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
  (work / "chat_template.jinja").write_text("stale")
  ours.save(work)
  assert not (work / "special_tokens_map.json").exists() and not (work / "chat_template.jinja").exists()
  assert transformers.AutoTokenizer.from_pretrained(work).eos_token_id == 1
  assert tok_lib.load_from_workdir(work).eos_id == 1


# ---- bad input: one line naming the problem and the fix


def test_broken_files_fail_in_one_line(byte_folder, tmp_path):
  broken = tmp_path / "broken"
  shutil.copytree(byte_folder, broken)
  (broken / "tokenizer.json").write_text('{"model": {"type": "NoSuchModel"}}')
  with pytest.raises(TokenizerError) as e:
    tok_lib.load_tokenizer(str(broken))
  assert "cannot be read by the tokenizers library" in one_line(e)

  (broken / "tokenizer.json").write_text("{not json")
  with pytest.raises(TokenizerError) as e:
    tok_lib.load_from_workdir(broken)
  assert "is not JSON" in one_line(e)

  (broken / "tokenizer.json").write_text('{"type": "wordpiece"}')
  with pytest.raises(TokenizerError) as e:
    tok_lib.load_tokenizer(str(broken / "tokenizer.json"))
  assert "is neither a Hugging Face tokenizer.json" in one_line(e)

  shutil.copy(byte_folder / "tokenizer.json", broken / "tokenizer.json")
  (broken / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nowhere|>"}))
  with pytest.raises(TokenizerError) as e:
    tok_lib.load_tokenizer(str(broken))
  assert "the eos token '<|nowhere|>' is not in tokenizer.json's vocabulary; fix eos_token" in one_line(e)


def test_tokenizer_without_any_eos_fails_in_one_line(tmp_path):
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel()
  tok.train_from_iterator([ENGLISH], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|sep|>"],
                                                          show_progress=False))
  tok.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(TokenizerError) as e:
    tok_lib.load_tokenizer(str(tmp_path))
  assert 'names no eos token, which ends every document; add "eos_token"' in one_line(e)


def test_vocabulary_larger_than_the_model_fails_in_one_line(byte_folder):
  ours = tok_lib.load_tokenizer(str(byte_folder))
  tok_lib.check_vocab(ours, 402)
  with pytest.raises(TokenizerError) as e:
    tok_lib.check_vocab(ours, 400)  # the 400 trained tokens fit; the two added chat tokens do not
  assert "model.vocab_size=400 is smaller than the tokenizer's vocabulary of 402" in one_line(e)
  assert "set model.vocab_size=402 or more" in str(e.value)


# ---- a converted model that tokenizes text


def random_llama(vocab_size: int, seed: int = 0):
  config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    bos_token_id=0, eos_token_id=1, pad_token_id=None)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """A tiny random Llama (vocab 512) with the byte-level tokenizer saved beside it, and its conversion."""
  hf_dir = tmp_path_factory.mktemp("llama_with_tokenizer")
  model = random_llama(512)
  model.save_pretrained(hf_dir)
  FLAVOURS["byte_level"](hf_dir)
  out = pathlib.Path(hf.import_hf(hf_dir, tmp_path_factory.mktemp("converted") / "work"))
  return hf_dir, model, out


def cli(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "llm_jax", *args], capture_output=True, text=True, timeout=600,
                        env={**os.environ, "CI": "true"})


def test_convert_keeps_the_tokenizer_files(llama):
  hf_dir, _, out = llama
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (out / name).read_bytes() == (hf_dir / name).read_bytes(), name
  assert config_lib.load_json(out / "config.json").data.tokenizer == str(out / "tokenizer.json")


def test_converted_model_generates_what_transformers_generates(llama):
  hf_dir, model, out = llama
  loaded = llm_jax.load(out)
  auto = transformers.AutoTokenizer.from_pretrained(hf_dir)
  assert isinstance(loaded.tokenizer, hf_tokenizer.HFTokenizer) and loaded.tokenizer.chat_template == TEMPLATE
  prompt = "The quick brown fox"
  detail = loaded.generate([prompt], max_new_tokens=8, return_details=True)[0]
  prompt_ids = auto(prompt, add_special_tokens=False).input_ids
  assert detail["prompt_token_ids"] == prompt_ids
  with torch.no_grad():
    expected = model.generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt_ids):].tolist()
  ids = detail["token_ids"]
  assert ids == expected[:len(ids)] and (len(ids) == 8 or ids[-1] == loaded.tokenizer.eos_id)
  body = [i for i in ids if i not in (loaded.tokenizer.bos_id, loaded.tokenizer.eos_id)]
  assert detail["text"] == auto.decode(body, skip_special_tokens=False)
  assert loaded.generate([prompt], max_new_tokens=8) == [detail["text"]]


def test_cli_generate_on_a_converted_model(llama):
  _, _, out = llama
  result = cli("generate", "--workdir", str(out), "--prompt", "天地玄黄", "--max-new-tokens", "6", "--json")
  assert result.returncode == 0, result.stderr[-2000:]
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  expected = llm_jax.load(out).generate(["天地玄黄"], max_new_tokens=6, return_details=True)[0]
  assert printed["prompt_token_ids"] == llm_jax.load(out).tokenizer.encode("天地玄黄")
  assert (printed["token_ids"], printed["text"]) == (expected["token_ids"], expected["text"])


def test_convert_to_hf_copies_the_tokenizer_back(llama, tmp_path):
  hf_dir, _, out = llama
  back = pathlib.Path(hf.export_hf(out, tmp_path / "back"))
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (back / name).read_bytes() == (hf_dir / name).read_bytes(), name
  auto = transformers.AutoTokenizer.from_pretrained(back)
  assert auto(HELD_OUT["held_out_chinese"], add_special_tokens=False).input_ids == llm_jax.load(out).tokenizer.encode(
      HELD_OUT["held_out_chinese"])
  assert auto.chat_template == TEMPLATE


@pytest.mark.slow
def test_fine_tune_from_a_converted_model_on_text(llama, tmp_path):
  """`train.init_from` with the converted config: its tokenizer.json tokenizes the text, and the run keeps it."""
  _, _, out = llama
  (tmp_path / "text.txt").write_text((ENGLISH + CHINESE) * 20, encoding="utf-8")
  tuned = tmp_path / "tuned"
  result = cli("train", "--config", str(out / "config.json"), "--workdir", str(tuned), f"train.init_from={out}",
               f"data.source=text:{tmp_path / 'text.txt'}", "train.steps=1", "train.batch_size=8",
               "train.eval_every=0", "optim.learning_rate=0", "optim.warmup_steps=0")
  assert result.returncode == 0, result.stderr[-2000:]
  assert (tuned / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
  loaded = llm_jax.load(tuned)
  assert loaded.tokenizer.chat_template == TEMPLATE
  assert loaded.generate(["The quick"], max_new_tokens=4) == llm_jax.load(out).generate(["The quick"], max_new_tokens=4)


def test_convert_refuses_a_tokenizer_larger_than_the_model(tmp_path):
  hf_dir = tmp_path / "hf"
  random_llama(256).save_pretrained(hf_dir)
  FLAVOURS["byte_level"](hf_dir)  # 402 tokens for a 256-row embedding
  result = cli("convert", "--from-hf", str(hf_dir), "--out", str(tmp_path / "work"))
  assert result.returncode == 2
  line = result.stderr.strip()
  assert "\n" not in line
  assert "tokenizer has 402 tokens (added ones included) but its config.json vocab_size is 256" in line
  assert not (tmp_path / "work").exists()  # checked before anything is written
