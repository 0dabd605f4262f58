"""Instruction SFT data: Alpaca and chat records, response-only loss masks, whole-example packing, truncation from
the prompt side, held-out records, process-independent rows, exact resume, one-line errors, and generation
through the run's template."""

import dataclasses
import json
import logging
import pathlib

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import llm_jax
from llm_jax import checkpoint, cli
from llm_jax import config as config_lib
from llm_jax.config import DataConfig
from llm_jax.data import examples, packing, pipeline, sources, templates
from llm_jax.data.documents import DataError
from llm_jax.data.templates import Message
from llm_jax.data.tokenizer import ByteTokenizer, EOS_ID, PAD_ID
from llm_jax.model import presets, transformer
from test_pipeline import KEYS, assert_same, take  # tests/test_pipeline.py

BYTES = ByteTokenizer()
REPO = pathlib.Path(__file__).resolve().parents[1]


def alpaca_records(n: int, long_every: int = 0) -> list[dict]:
  """Unique records, English and Chinese, some with an input; every `long_every`-th has a long instruction."""
  records = []
  for i in range(n):
    instruction = f"Task {i}: " + ("describe the sea " * 12 if long_every and i % long_every == 0 else "name a colour.")
    if i % 3 == 1:
      instruction = f"任务 {i}：用一句话解释日心说。"
    records.append({"instruction": instruction, "input": f"context {i}" if i % 4 == 2 else "",
                    "output": f"Answer {i}: " + ("蓝色。" if i % 2 else "blue.") * (1 + i % 5)})
  return records


def write_json(path, records) -> str:
  path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
  return f"json:{path}"


def write_jsonl(path, records) -> str:
  path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
  return f"jsonl:{path}"


def chat_records(n: int) -> list[dict]:
  records = []
  for i in range(n):
    messages = [{"role": "system", "content": "Be brief."}] if i % 2 else []
    for turn in range(1 + i % 3):
      messages += [{"role": "user", "content": f"Q{i}.{turn}: 多少？"}, {"role": "assistant", "content": f"A{i}.{turn} 三"}]
    records.append({"messages": messages})
  return records


def segments(batch: dict, row: int) -> list[dict[str, np.ndarray]]:
  """The fields of each non-padding segment of one row, in order."""
  ids = batch["segment_ids"][row]
  return [{key: batch[key][row][ids == s] for key in KEYS} for s in range(1, int(ids.max()) + 1)]


def runs(mask: np.ndarray) -> list[np.ndarray]:
  """Index arrays of the contiguous runs where `mask` is set."""
  idx = np.flatnonzero(mask)
  return np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1) if len(idx) else []


def all_tokens(data: DataConfig, split: str) -> list[examples.Tokens]:
  docs = sources.load(data, split)
  return examples.encode(list(docs), templates.from_config(data, BYTES), BYTES, data.seq_len)


# ----------------------------------------------------------------------------- the loss mask


@pytest.mark.parametrize("template", ["alpaca", "chatml"])
def test_loss_mask_is_exactly_each_output_and_its_eos(tmp_path, template):
  records = alpaca_records(40)
  data = DataConfig(source=write_json(tmp_path / "a.json", records), format="alpaca", template=template, seq_len=512,
                    eval_fraction=0.0)
  by_instruction = {r["instruction"]: r["output"] for r in records}
  seen = set()
  for batch in take(pipeline.make_batches(data, BYTES, batch_size=4, seed=1, mesh=None), 6):
    for row in range(4):
      for seg in segments(batch, row):
        text = BYTES.decode(seg["inputs"])
        instruction = next(i for i in by_instruction if i in text)
        masked = seg["targets"][seg["loss_mask"] > 0]
        assert masked[-1] == EOS_ID and (masked[:-1] != EOS_ID).all()  # the output, then the eos that ends it
        assert BYTES.decode(masked) == by_instruction[instruction]  # decode drops the eos
        assert seg["inputs"][-1] == EOS_ID  # nothing after the response's eos
        seen.add(instruction)
  assert len(seen) > 20 and any("任务" in i for i in seen)


def test_chat_loss_mask_covers_every_assistant_turn_and_nothing_else(tmp_path):
  records = chat_records(12)
  data = DataConfig(source=write_jsonl(tmp_path / "chat.jsonl", records), format="chat", template="chatml",
                    seq_len=400, eval_fraction=0.0)
  answers = {r["messages"][-2]["content"]: [m["content"] for m in r["messages"] if m["role"] == "assistant"]
             for r in records}  # keyed by the last user turn, unique per record
  checked = 0
  for batch in take(pipeline.make_batches(data, BYTES, batch_size=2, seed=0, mesh=None), 8):
    for row in range(2):
      for seg in segments(batch, row):
        key = next(k for k in answers if k in BYTES.decode(seg["inputs"]))
        spans = runs(seg["loss_mask"] > 0)
        assert [BYTES.decode(seg["targets"][s]) for s in spans] == answers[key]
        assert [seg["targets"][s][-1] for s in spans] == [EOS_ID] * len(answers[key])
        assert all("<|im_start|>user" not in BYTES.decode(seg["targets"][s]) for s in spans)
        checked += 1
  assert checked >= 12


# ----------------------------------------------------------------------------- packing


def test_rows_pack_whole_examples_in_slot_order_and_pad_the_rest(tmp_path):
  """Eval order is the examples in order, cycled: slot r holds examples r, r + B, r + 2B, ... exactly, each whole
  in one row with its own segment and positions 0..n-1, and the row ends in padding."""
  source = write_json(tmp_path / "a.json", alpaca_records(23))
  data = DataConfig(source=source, eval_source=source, format="alpaca", seq_len=300)
  expected = all_tokens(data, "eval")
  assert all(len(t) <= 300 and not t.cut for t in expected)  # short enough: no cuts in this test
  B = 3
  batches = take(pipeline.make_batches(data, BYTES, batch_size=B, seed=0, mesh=None, split="eval"), 12)
  for row in range(B):
    consumed = 0
    for batch in batches:
      ids = batch["segment_ids"][row]
      used = int((ids > 0).sum())
      assert (ids[:used] > 0).all() and (ids[used:] == 0).all()  # examples first, then only padding
      assert (batch["inputs"][row][used:] == PAD_ID).all() and (batch["loss_mask"][row][used:] == 0).all()
      assert (batch["loss_mask"][row][max(used - 1, 0):] == 0).all()  # the last token predicts nothing
      for seg in segments(batch, row):
        want = expected[(row + consumed * B) % len(expected)]
        np.testing.assert_array_equal(seg["inputs"], want.ids)
        np.testing.assert_array_equal(seg["positions"], np.arange(len(want)))
        np.testing.assert_array_equal(seg["loss_mask"], np.append(want.trained[1:], False))
        consumed += 1
      next_example = expected[(row + consumed * B) % len(expected)]
      assert used + len(next_example) > 300  # a row is closed only when the next example does not fit


def test_truncation_keeps_the_response_and_counts_the_cut_examples(tmp_path, caplog):
  records = alpaca_records(30, long_every=5)  # 6 long instructions
  records[7]["output"] = "A long answer. " * 40  # a response alone longer than seq_len
  data = DataConfig(source=write_json(tmp_path / "a.json", records), format="alpaca", seq_len=200, eval_fraction=0.0)
  with caplog.at_level(logging.WARNING):
    iterator = pipeline.make_batches(data, BYTES, batch_size=2, seed=0, mesh=None)
  tokens = all_tokens(data, "train")
  cut = [t.cut for t in tokens]
  assert cut.count("response") == 1 and cut.count("prompt") >= 6 and iterator.truncated == cut.count("prompt") + 1
  assert f"a.json: {iterator.truncated} of 30 examples are longer than data.seq_len=200 tokens: " in caplog.text
  assert caplog.text.count("examples are longer than") == 1
  prompt_cut = [(r, t) for r, t in zip(records, tokens) if t.cut == "prompt"]
  for record, t in prompt_cut:  # the whole response survives; the prompt lost its start
    assert len(t) == 200 and BYTES.decode(t.ids[t.trained]) == record["output"] and t.ids[-1] == EOS_ID
    assert BYTES.decode(t.ids).endswith(f"### Response:\n{record['output']}")
    assert not BYTES.decode(t.ids).startswith("Below is")
  long = tokens[7]  # the prompt's last 100 tokens, then the response's first 100, no eos
  assert len(long) == 200 and not long.trained[:100].any() and long.trained[100:].all()
  assert BYTES.decode(long.ids[100:]) == records[7]["output"][:100] and EOS_ID not in long.ids
  assert BYTES.decode(long.ids[:100]).endswith("### Response:\n")
  pipeline.make_batches(data, BYTES, batch_size=2, seed=0, mesh=None)  # logged once per setup and process
  assert caplog.text.count("examples are longer than") == 1
  batch = next(iterator)
  assert (batch["segment_ids"] >= 0).all() and batch["inputs"].shape == (2, 200)


def test_fit_by_hand():
  ids = np.arange(10, dtype=np.int32)
  trained = np.array([0, 0, 0, 1, 1, 0, 0, 1, 1, 1], bool)
  whole = examples.Tokens(ids, trained)
  assert examples.fit(whole, 10) is whole
  kept = examples.fit(whole, 6)
  assert kept.ids.tolist() == [4, 5, 6, 7, 8, 9] and kept.cut == "prompt"
  kept = examples.fit(whole, 2)  # the last response (3 tokens) exceeds 2: 1 prompt token, then its first token
  assert kept.ids.tolist() == [6, 7] and kept.trained.tolist() == [False, True] and kept.cut == "response"
  all_trained = examples.Tokens(ids, np.ones(10, bool))
  assert examples.fit(all_trained, 4).ids.tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- order, sharding, resume


def mesh_of(data: int, fsdp: int, tensor: int) -> Mesh:
  return Mesh(np.array(jax.devices()).reshape(data, fsdp, tensor), ("data", "fsdp", "tensor"))


@pytest.fixture
def chat_data(tmp_path) -> DataConfig:
  return DataConfig(source=write_jsonl(tmp_path / "chat.jsonl", chat_records(37)), format="chat", template="chatml",
                    seq_len=160, eval_fraction=0.05)


def test_rows_do_not_depend_on_how_many_processes_build_them(chat_data):
  single = take(pipeline.make_batches(chat_data, BYTES, batch_size=8, seed=4, mesh=None), 5)
  on_mesh = take(pipeline.make_batches(chat_data, BYTES, batch_size=8, seed=4, mesh=mesh_of(2, 4, 1)), 5)
  assert_same(on_mesh, single)
  # Each of 4 processes builds its 2 slots: the rows are the single process's rows 2p and 2p + 1.
  docs = grain_ordered(chat_data, seed=4)
  template = templates.from_config(chat_data, BYTES)
  for process in range(4):
    share = packing.PackedRows(docs, BYTES, [2 * process, 2 * process + 1], 8, 160, template)
    rows = iter(share)
    for k in range(5):
      part = next(rows)
      for key in KEYS:
        np.testing.assert_array_equal(part[key], single[k][key][2 * process:2 * process + 2], err_msg=key)


def grain_ordered(data: DataConfig, seed: int):
  import grain
  return grain.MapDataset.source(sources.load(data, "train")).shuffle(seed=seed).repeat()


def test_resume_continues_exactly_and_refuses_another_template(chat_data):
  uninterrupted = take(pipeline.make_batches(chat_data, BYTES, batch_size=4, seed=3, mesh=None), 9)
  iterator = pipeline.make_batches(chat_data, BYTES, batch_size=4, seed=3, mesh=mesh_of(1, 4, 2))
  assert_same(take(iterator, 5), uninterrupted[:5])
  state = json.loads(json.dumps(iterator.get_state()))
  assert state["format"] == "chat" and state["template"] == "chatml"
  assert all(offset == 0 for _, offset in state["iterator"]["streams"].values())  # whole examples only
  resumed = pipeline.make_batches(chat_data, BYTES, batch_size=4, seed=3, mesh=None)
  resumed.set_state(state)
  assert_same(take(resumed, 4), uninterrupted[5:])
  other = pipeline.make_batches(dataclasses.replace(chat_data, template="alpaca"), BYTES, batch_size=4, seed=3,
                                mesh=None)
  with pytest.raises(DataError, match="this run has data.template='alpaca' but its checkpoint was saved with 'chatml'"):
    other.set_state(state)


def test_held_out_records_are_deterministic_and_left_out_of_training(chat_data):
  train, held = sources.load(chat_data, "train"), sources.load(chat_data, "eval")
  assert (len(train), len(held)) == (35, 2)  # round(5% of 37)
  assert [c.origin.rsplit(" ", 1)[1] for c in held] == ["10", "28"]  # evenly spaced lines, seed-independent
  assert not {c.origin for c in held} & {c.origin for c in train}
  first = take(pipeline.make_batches(chat_data, BYTES, batch_size=2, seed=0, mesh=None, split="eval"), 3)
  assert_same(first, take(pipeline.make_batches(chat_data, BYTES, batch_size=2, seed=7, mesh=None, split="eval"), 3))
  text = BYTES.decode(first[0]["inputs"].reshape(-1))
  assert "Q9.0" in text and "Q27.0" in text and "Q0.0" not in text


# ----------------------------------------------------------------------------- the shared demo sets and the config


@pytest.mark.parametrize("name", ["alpaca_en_demo.json", "alpaca_zh_demo.json"])
def test_demo_sets_tokenize_and_pack_with_bytes(shared_data, name):
  path = shared_data / "instruct" / name
  records = json.loads(path.read_text(encoding="utf-8"))
  data = DataConfig(source=f"json:{path}", format="alpaca", seq_len=256, eval_fraction=0.05)
  assert len(sources.load(data, "train")) + len(sources.load(data, "eval")) == len(records)
  assert len(sources.load(data, "eval")) == round(0.05 * len(records))
  outputs = {r["output"].encode("utf-8") for r in records}
  batch = next(pipeline.make_batches(data, BYTES, batch_size=8, seed=0, mesh=None))
  for row in range(8):
    for seg in segments(batch, row):
      masked = seg["targets"][seg["loss_mask"] > 0]
      response = (masked[masked != EOS_ID] - 4).astype(np.uint8).tobytes()  # bytes: a cut may split a character
      assert (response in outputs and masked[-1] == EOS_ID) or any(o.startswith(response) for o in outputs)
      assert BYTES.decode(seg["inputs"]).count("### Response:\n") == 1


def test_sft_alpaca_config_builds_train_and_eval_batches(shared_data):
  config = config_lib.load_file(REPO / "configs/sft_alpaca.py")
  assert config.data.source == "json:../shared/data/instruct/alpaca_en_demo.json"  # from the repo root, as documented
  config = config_lib.override(config, [f"data.source=json:{shared_data / 'instruct/alpaca_en_demo.json'}"])
  config_lib.validate(config, num_devices=2)
  assert (config.data.format, config.data.template, config.data.eval_fraction) == ("alpaca", "alpaca", 0.05)
  assert config.model.max_len == 256 and config.model.vocab_size == 512  # the fallback model: bytes, 256 positions
  assert config.sample.prompt == "Give three tips for staying healthy."  # the trainer renders it through the template
  assert len(sources.load(config.data, "eval")) == 50 and len(sources.load(config.data, "train")) == 949
  for split in ("train", "eval"):
    batch = next(pipeline.make_batches(config.data, BYTES, batch_size=config.train.batch_size, seed=0, mesh=None,
                                       split=split))
    assert batch["inputs"].shape == (16, 256) and batch["loss_mask"].sum() > 0


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("content, data_format, message", [
    ('[{"instruction": "a", "input": ""}]', "alpaca",
     r"a.json record 1 has no 'output' string \(it has \['input', 'instruction'\]\); every Alpaca record needs "
     r"instruction and output \(input may be empty\)"),
    ('[{"instruction": "a", "output": "b"}, {"instruction": "c", "input": 3, "output": "d"}]', "alpaca",
     r"a.json record 2: 'input' is a int, not a string"),
    ('[]', "alpaca", r"a.json holds no records; add some or leave the file out of data.source"),
    ('', "alpaca", r"a.json holds no records"),
    ('{"instruction": "a"}', "alpaca", r"a.json holds a JSON dict, not an array of records"),
    ('[{"instruction": "a", ', "alpaca", r"a.json: not JSON \(.* at line 1 column \d+\); a json: source is one JSON"),
    ('[{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}]', "chat",
     r"a.json record 1: message 2 has role 'bot'; use one of system, user, assistant"),
    ('[{"messages": [{"role": "user", "content": "hi"}]}]', "chat",
     r"a.json record 1 has no assistant message, so nothing to train on; add the response or drop the record"),
    ('[{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}]', "chat",
     r"a.json record 1: message 1 \(user\) has no 'content' string"),
    ('[{"text": "hi"}]', "chat", r"a.json record 1 has no 'messages' list \(found \['text'\]\); a chat record is"),
])
def test_bad_json_records_fail_in_one_line_naming_file_and_record(tmp_path, content, data_format, message):
  (tmp_path / "a.json").write_text(content)
  data = DataConfig(source=f"json:{tmp_path / 'a.json'}", format=data_format)
  with pytest.raises(DataError, match=message) as caught:
    pipeline.make_batches(data, BYTES, batch_size=1, seed=0, mesh=None)
  assert "\n" not in str(caught.value)


def test_bad_sources_and_settings_fail_in_one_line(tmp_path):
  good = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
  (tmp_path / "chat.jsonl").write_text(json.dumps(good[0]) + "\n" + json.dumps({"messages": [{"role": "tool"}]}) + "\n")
  cases = [
      (DataConfig(source=f"jsonl:{tmp_path}/chat.jsonl", format="chat"),
       r"chat.jsonl line 2: message 1 has role 'tool'; use one of system, user, assistant"),
      (DataConfig(source=f"text:{tmp_path}/chat.jsonl", format="chat"),
       r"data.format=chat reads records from json:GLOB or jsonl:GLOB, not 'text:"),
      (DataConfig(source=f"json:{tmp_path}/chat.jsonl"),
       r"holds instruction records: set data.format=alpaca or data.format=chat"),
      (DataConfig(source=f"jsonl:{tmp_path}/none*.jsonl", format="chat"), r"matches no file"),
  ]
  (tmp_path / "empty.jsonl").write_text("\n\n")
  cases.append((DataConfig(source=f"jsonl:{tmp_path}/empty.jsonl", format="alpaca"), r"empty.jsonl holds no records"))
  (tmp_path / "ok.jsonl").write_text(json.dumps(good[0]) + "\n")
  cases.append((DataConfig(source=f"jsonl:{tmp_path}/ok.jsonl", format="chat", template="tokenizer"),
                r"data.template=tokenizer, but ByteTokenizer\(\) has no chat template"))
  for data, message in cases:
    with pytest.raises(DataError, match=message) as caught:
      pipeline.make_batches(data, BYTES, batch_size=1, seed=0, mesh=None)
    assert "\n" not in str(caught.value)
  with pytest.raises(DataError, match=r"holds \d+ tokens, fewer than one batch of 4096"):
    pipeline.make_batches(DataConfig(source=f"jsonl:{tmp_path}/ok.jsonl", format="chat", eval_fraction=0.0), BYTES,
                          batch_size=16, seed=0, mesh=None)
  with pytest.raises(config_lib.ConfigError, match="data.format='sft': expected one of text, alpaca, chat"):
    config_lib.override(config_lib.Config(), ["data.format=sft"])


# ----------------------------------------------------------------------------- generation through the template


@pytest.fixture(scope="module")
def sft_model_dir(tmp_path_factory):
  """A saved model whose config is an Alpaca SFT run (random weights: generation is checked for its prompt)."""
  folder = tmp_path_factory.mktemp("sft") / "model"
  config = config_lib.Config(model=dataclasses.replace(presets.get("tiny-gpt2"), vocab_size=512, max_len=256),
                             data=DataConfig(source="json:x.json", format="alpaca", template="alpaca"))
  checkpoint.save_params(folder, transformer.init_params(config.model, jax.random.key(0)), config)
  BYTES.save(folder)
  return folder


def test_generate_renders_the_prompt_through_the_runs_template(sft_model_dir, capsys):
  model = llm_jax.load(sft_model_dir)
  rendered = templates.render_prompt(templates.Alpaca(), "Say hi.")
  assert model.prompt_text("Say hi.") == rendered
  (detail,) = model.generate(["Say hi."], max_new_tokens=2, return_details=True)
  assert detail["prompt_token_ids"] == BYTES.encode(rendered)
  (raw,) = model.generate(["Say hi."], raw=True, max_new_tokens=2, return_details=True)
  assert raw["prompt_token_ids"] == BYTES.encode("Say hi.")
  assert cli.main(["generate", "--workdir", str(sft_model_dir), "--prompt", "Say hi.", "--max-new-tokens", "2",
                   "--json"]) == 0
  assert cli.main(["generate", "--workdir", str(sft_model_dir), "--prompt", "Say hi.", "--max-new-tokens", "2",
                   "--json", "--raw"]) == 0
  templated, as_is = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert templated["prompt"] == rendered and templated["prompt_token_ids"] == BYTES.encode(rendered)
  assert as_is["prompt"] == "Say hi." and as_is["token_ids"] == raw["token_ids"]
  assert templated["token_ids"] == detail["token_ids"]


def test_training_prompt_equals_the_generation_prompt():
  """What `generate` feeds the model is, token for token, what training put before the response."""
  conversation = templates.Conversation((Message("user", "Say hi."), Message("assistant", "Hi!")), "test")
  (tokens,) = examples.encode([conversation], templates.Alpaca(), BYTES, seq_len=1024)
  first = int(np.argmax(tokens.trained))
  assert tokens.ids[:first].tolist() == BYTES.encode(templates.render_prompt(templates.Alpaca(), "Say hi."))
  assert BYTES.decode(tokens.ids[first:]) == "Hi!" and tokens.ids[-1] == EOS_ID


# ----------------------------------------------------------------------------- the loss on SFT batches


@pytest.fixture(scope="module")
def sft_batch(tmp_path_factory):
  """A real packed SFT batch (several examples to a row) and a tiny model to score it."""
  source = write_json(tmp_path_factory.mktemp("sft") / "alpaca.json", alpaca_records(24))
  data = DataConfig(source=source, format="alpaca", template="chatml", seq_len=256, eval_fraction=0.1)
  batch = take(pipeline.make_batches(data, BYTES, batch_size=4, seed=0, mesh=None), 1)[0]
  assert (batch["segment_ids"].max(axis=1) >= 2).all(), "each row should pack several examples"
  model = dataclasses.replace(presets.get("tiny-gpt2"), vocab_size=512, max_len=256)
  return batch, model, transformer.init_params(model, jax.random.key(0))


def test_prompt_targets_change_neither_loss_nor_gradients(sft_batch):
  from llm_jax.train import losses
  batch, model, params = sft_batch
  value_and_grad = jax.jit(jax.value_and_grad(lambda p, b: losses.lm_loss(p, b, None, model=model)[0]))
  loss, grads = value_and_grad(params, batch)
  prompt = batch["loss_mask"] == 0
  other = dict(batch, targets=np.where(prompt, (batch["targets"] + 7) % 256, batch["targets"]))
  assert (other["targets"] != batch["targets"]).sum() > 100
  other_loss, other_grads = value_and_grad(params, other)
  assert float(other_loss) == float(loss)
  jax.tree.map(np.testing.assert_array_equal, other_grads, grads)


def test_packed_rows_give_the_loss_of_each_example_alone(sft_batch):
  from llm_jax.train import losses
  batch, model, params = sft_batch
  loss = jax.jit(lambda p, b: losses.lm_loss(p, b, None, model=model)[1]["loss"])  # compiled once a length
  packed = float(loss(params, batch))
  alone = 0.0
  for row in range(batch["inputs"].shape[0]):
    for example in segments(batch, row):
      single = {key: value[None] for key, value in example.items()}
      single["segment_ids"] = np.ones_like(single["segment_ids"])
      alone += float(loss(params, single))
  assert packed == pytest.approx(alone, rel=1e-5)


# ----------------------------------------------------------------------------- what SFT teaches, end to end

ANSWERS = {"Name a fruit.": "An apple.", "Name a colour.": "Red.", "Name an animal.": "A small cat."}


def test_sft_run_learns_to_answer_through_its_template_and_stop_at_eos(tmp_path):
  """The trainer on real Alpaca records: the held-out response loss falls, and `generate` (greedy, through the
  run's template) answers each instruction with its response and stops at eos, not at the token limit. Fails if
  the eos is left out of the loss, the prompt is rendered otherwise than in training, or decoding ignores eos."""
  from llm_jax.train import loop
  records = [{"instruction": instruction, "input": f"({i})" if i % 2 else "", "output": output}
             for i in range(40) for instruction, output in ANSWERS.items()]
  config = config_lib.Config(
      model=dataclasses.replace(presets.get("tiny-gpt2"), vocab_size=512, max_len=256),
      mesh=config_lib.MeshConfig(data=-1, fsdp=1, tensor=1),  # the test's 8 devices, a row each
      optim=config_lib.OptimConfig(learning_rate=3e-3, warmup_steps=10, schedule="constant", weight_decay=0.0),
      data=DataConfig(source=write_json(tmp_path / "answers.json", records), format="alpaca", template="alpaca",
                      eval_fraction=0.1, seq_len=256),
      train=config_lib.TrainConfig(steps=100, batch_size=8, log_every=25, eval_every=25, eval_batches=1,
                                   checkpoint_every=100),
      sample=config_lib.SampleConfig(max_new_tokens=0))
  loop.train(config, tmp_path / "run")
  evals = [r["eval_loss"] for r in map(json.loads, (tmp_path / "run/metrics.jsonl").read_text().splitlines())
           if "eval_loss" in r]
  assert len(evals) == 4 and evals[-1] < 0.2 * evals[0], evals
  model = llm_jax.load(tmp_path / "run")
  details = model.generate(list(ANSWERS), max_new_tokens=40, return_details=True)
  assert [d["text"] for d in details] == list(ANSWERS.values())
  assert [d["finish_reason"] for d in details] == ["eos"] * len(ANSWERS)
