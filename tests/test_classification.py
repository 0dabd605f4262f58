"""Classification: last-token pooling, the loss, packed batches with labels, bad rows, the classifier in
checkpoints, and a tiny SST-2 run through the real CLI that beats the majority class."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_loop import REPO, train

from llm_jax import checkpoint, sharding
from llm_jax import config as config_lib
from llm_jax.data import packing, pipeline, sources
from llm_jax.data.documents import DataError
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.model import heads, presets, transformer
from llm_jax.train import loop, losses

MODEL = dataclasses.replace(presets.get("tiny-gpt2"), vocab_size=tokenizer_lib.BYTE_VOCAB_SIZE, num_classes=3)
BYTES = tokenizer_lib.load_tokenizer("byte")
ROWS = [("a fine film", 2), ("dull", 0), ("it is neither good nor bad", 1), ("bold , funny and warm", 2),
        ("a mess", 0), ("so-so", 1), ("the best of the year", 2), ("tedious and long", 0)]


def write_tsv(path, rows, header="sentence\tlabel"):
  path.write_text("\n".join([header, *(f"{text} \t{label}" for text, label in rows)]) + "\n")
  return path


def data_config(tmp_path, rows=ROWS * 4, **kw):
  source = write_tsv(tmp_path / "train.tsv", rows)
  return config_lib.DataConfig(source=f"tsv:{source}", eval_source=f"tsv:{source}", format="classification",
                               seq_len=64, prefetch=0, **kw)


def last_tokens_by_loop(segments_BL):
  """Where each segment (> 0) of each row ends, by walking the row."""
  out = np.zeros(segments_BL.shape, bool)
  for b, row in enumerate(segments_BL):
    for i, segment in enumerate(row):
      if segment and (i + 1 == len(row) or row[i + 1] != segment):
        out[b, i] = True
  return out


def test_last_tokens_under_padding_and_packing():
  rng = np.random.default_rng(0)
  rows = []
  for _ in range(20):  # packed examples of random lengths, then padding (or none)
    lengths, row = rng.integers(1, 6, size=rng.integers(1, 5)), []
    for segment, n in enumerate(lengths, 1):
      row += [segment] * int(n)
    rows.append((row + [0] * 24)[:24])
  segments_BL = np.array(rows, np.int32)
  np.testing.assert_array_equal(np.asarray(heads.last_tokens(jnp.asarray(segments_BL))),
                                last_tokens_by_loop(segments_BL))
  assert last_tokens_by_loop(segments_BL).sum(1).min() >= 1  # every row has an example


def test_packed_examples_classify_as_each_alone():
  """The logits at an example's last token do not depend on the examples packed beside it or the padding."""
  params = transformer.init_params(MODEL, jax.random.key(0))
  a, b = BYTES.encode("a fine film") + [2], BYTES.encode("dull") + [2]
  L = 24
  def row(*examples):
    ids, seg = [], []
    for s, ex in enumerate(examples, 1):
      ids, seg = ids + ex, seg + [s] * len(ex)
    return ids + [0] * (L - len(ids)), seg + [0] * (L - len(seg))
  rows = [row(a, b), row(a), row(b)]
  fields = packing.batch_fields(np.array([r[0] for r in rows], np.int32), np.array([r[1] for r in rows], np.int32))
  hidden_BLD = transformer.hidden(params, MODEL, fields["inputs"], segment_ids_BL=fields["segment_ids"],
                                  positions_BL=fields["positions"])
  logits_BLC = np.asarray(heads.classify(params, MODEL, hidden_BLD))
  np.testing.assert_allclose(logits_BLC[0, len(a) - 1], logits_BLC[1, len(a) - 1], atol=1e-5)
  np.testing.assert_allclose(logits_BLC[0, len(a) + len(b) - 1], logits_BLC[2, len(b) - 1], atol=1e-5)
  assert np.abs(logits_BLC[1, len(a) - 1] - logits_BLC[2, len(b) - 1]).max() > 1e-4  # different sentences differ


def test_forward_is_hidden_then_the_lm_head():
  params = transformer.init_params(MODEL, jax.random.key(1))
  tokens = jnp.asarray(np.arange(2 * 16).reshape(2, 16) % MODEL.vocab_size, jnp.int32)
  np.testing.assert_allclose(np.asarray(transformer.forward(params, MODEL, tokens)),
                             np.asarray(transformer.lm_head(params, MODEL, transformer.hidden(params, MODEL, tokens))),
                             atol=1e-6)
  assert transformer.logical_axes(MODEL)["classifier"] == {"kernel": ("embed", None), "bias": (None,)}
  assert params["classifier"]["kernel"].shape == (MODEL.d_model, 3)
  assert "classifier" not in transformer.init_params(dataclasses.replace(MODEL, num_classes=0), jax.random.key(1))


def test_classification_loss_against_numpy(tmp_path):
  params = transformer.init_params(MODEL, jax.random.key(2))
  params["classifier"]["bias"] = jnp.array([0.3, -0.2, 0.1])  # a bias that counts
  with pipeline.make_batches(data_config(tmp_path), BYTES, batch_size=2, seed=0, mesh=None) as batches:
    batch = next(batches)
  objective, sums = jax.jit(lambda p, b: losses.classification_loss(p, b, None, model=MODEL))(params, batch)
  h_BLD = np.asarray(transformer.hidden(params, MODEL, batch["inputs"], segment_ids_BL=batch["segment_ids"],
                                        positions_BL=batch["positions"]), np.float64)
  logits_BLC = h_BLD @ np.asarray(params["classifier"]["kernel"], np.float64) + np.asarray(params["classifier"]["bias"])
  where = batch["labels"] >= 0
  picked_NC, labels_N = logits_BLC[where], batch["labels"][where]
  log_p_NC = picked_NC - np.log(np.exp(picked_NC).sum(-1, keepdims=True))
  expected = -log_p_NC[np.arange(len(labels_N)), labels_N].sum()
  assert len(labels_N) >= 4  # several examples per row
  np.testing.assert_allclose(float(objective), expected, rtol=1e-5)
  np.testing.assert_allclose(float(sums["loss"]), expected, rtol=1e-5)
  assert float(sums["count"]) == len(labels_N)
  assert float(sums["correct"]) == (picked_NC.argmax(-1) == labels_N).sum()


def test_for_config_picks_the_classification_loss(tmp_path):
  config = config_lib.Config(model=MODEL, data=data_config(tmp_path))
  assert losses.for_config(config).func is losses.classification_loss
  assert losses.for_config(config_lib.Config()).func is losses.lm_loss


def test_packed_batches_put_each_label_at_its_examples_eos(tmp_path):
  by_text = dict(ROWS)
  with pipeline.make_batches(data_config(tmp_path), BYTES, batch_size=2, seed=0, mesh=None) as batches:
    batch_list = [next(batches) for _ in range(4)]
  assert max(batch["segment_ids"].max() for batch in batch_list) >= 3  # rows pack several examples
  for batch in batch_list:
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask", "labels"}
    assert batch["labels"].dtype == np.int32 and not batch["loss_mask"].any()
    ends = last_tokens_by_loop(batch["segment_ids"])
    np.testing.assert_array_equal(batch["labels"] >= 0, ends)
    assert (batch["inputs"][ends] == BYTES.eos_id).all()
    for b in range(2):
      row = batch["segment_ids"][b]
      for segment in range(1, row.max() + 1):
        at = np.flatnonzero(row == segment)
        np.testing.assert_array_equal(batch["positions"][b, at], np.arange(len(at)))
        text = BYTES.decode(batch["inputs"][b, at[:-1]].tolist())
        assert batch["labels"][b, at[-1]] == by_text[text]


def test_one_pass_reads_every_test_example_exactly_once(tmp_path):
  rows = [(f"sentence number {i}", i % 3) for i in range(23)]
  test = write_tsv(tmp_path / "test.tsv", rows)
  data = dataclasses.replace(data_config(tmp_path), test_source=f"tsv:{test}")
  mesh = sharding.make_mesh(config_lib.MeshConfig(data=-1, fsdp=1))
  seen = []
  for batch in pipeline.one_pass(data, BYTES, batch_size=8, mesh=mesh, num_classes=3):
    host = jax.device_get(batch)
    for b, i in zip(*np.nonzero(host["labels"] >= 0)):
      at = np.flatnonzero(host["segment_ids"][b] == host["segment_ids"][b, i])
      seen.append((BYTES.decode(host["inputs"][b, at[:-1]].tolist()), int(host["labels"][b, i])))
  assert sorted(seen) == sorted(rows)


@pytest.mark.parametrize("content, expected", [
    ("sentence\tlabel\ngood \t1\nno tab here\n",
     "train.tsv:3: no tab in 'no tab here'; each row is sentence<TAB>label"),
    ("sentence\tlabel\ngood \t1\nbad \t3\n", "train.tsv:3: label 3 is outside the classes 0..2; fix the row or set "
     "model.num_classes to the number of classes"),
    ("sentence\tlabel\ngood \tpositive\n", "train.tsv:2: label 'positive' is not an integer"),
    ("sentence\tlabel\n", "train.tsv holds no rows after its header; add lines of sentence<TAB>label"),
    ("", "train.tsv holds no rows after its header"),
    ("good \t1\nbad \t0\n", "train.tsv:1 looks like a data row, not a header; add a first line sentence<TAB>label"),
])
def test_bad_rows_fail_in_one_line_naming_file_and_line(tmp_path, content, expected):
  (tmp_path / "train.tsv").write_text(content)
  data = config_lib.DataConfig(source=f"tsv:{tmp_path / 'train.tsv'}", format="classification")
  with pytest.raises(DataError) as e:
    sources.load(data, "train", num_classes=3)
  assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, expected", [
    ({"model.num_classes": 0}, "data.format=classification with model.num_classes=0: a classifier needs both"),
    ({"data.format": "text"}, "data.format=text with model.num_classes=3"),
    ({"model.num_classes": 1}, "model.num_classes >= 2"),
])
def test_format_and_classes_go_together(tmp_path, overrides, expected):
  config = config_lib.override(config_lib.Config(model=MODEL, data=data_config(tmp_path)), overrides)
  with pytest.raises(config_lib.ConfigError, match=expected):
    config_lib.validate(config, jax.device_count())


def test_a_checkpoint_with_or_without_a_classifier_is_another_architecture():
  lm = dataclasses.replace(MODEL, num_classes=0)
  with pytest.raises(checkpoint.CheckpointError, match=r"ckpt has no parameter classifier\.bias .*another arch"):
    checkpoint.check_same_architecture(lm, MODEL, "ckpt")
  with pytest.raises(checkpoint.CheckpointError, match=r"ckpt has parameter classifier\.bias that this model lacks"):
    checkpoint.check_same_architecture(MODEL, lm, "ckpt")
  with pytest.raises(checkpoint.CheckpointError, match="ckpt: parameter classifier.bias has shape"):
    checkpoint.check_same_architecture(dataclasses.replace(MODEL, num_classes=2), MODEL, "ckpt")


def test_init_from_a_language_model_keeps_its_weights_and_adds_a_fresh_classifier(tmp_path):
  lm = dataclasses.replace(MODEL, num_classes=0)
  base = transformer.init_params(lm, jax.random.key(5))
  checkpoint.save_params(tmp_path / "base", base, config_lib.Config(model=lm))
  config = config_lib.Config(model=MODEL, data=data_config(tmp_path), train=config_lib.TrainConfig(
      init_from=str(tmp_path / "base")))
  config = loop.with_base(config)
  assert config.model.num_classes == 3  # the fine-tuning's own, not the base's 0
  mesh = sharding.make_mesh(config.mesh)
  target = sharding.param_shardings(mesh, transformer.logical_axes(MODEL), transformer.abstract_params(MODEL))
  fresh = transformer.init_params(MODEL, jax.random.key(6))
  params = loop._restore_base(config, mesh, target, fresh)
  np.testing.assert_array_equal(params["classifier"]["kernel"], fresh["classifier"]["kernel"])
  for path, value in jax.tree_util.tree_leaves_with_path(base):
    np.testing.assert_array_equal(value, _at(params, path))
  assert jax.tree.structure(params) == jax.tree.structure(fresh)


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


@pytest.mark.slow
def test_tiny_sst2_run_beats_the_majority_class(shared_data, tmp_path):
  """4,000 SST-2 phrases through `llm-jax tokenizer train` and `llm-jax train`: the whole held-out set,
  scored once at the end, beats always answering its most frequent class."""
  sst2 = shared_data / "sst2"
  head, *train_rows = (sst2 / "train.tsv").read_text().splitlines()[:4001]
  held_out = (sst2 / "dev.tsv").read_text().splitlines()[1:401]
  (tmp_path / "train.tsv").write_text("\n".join([head, *train_rows]) + "\n")
  (tmp_path / "test.tsv").write_text("\n".join([head, *held_out]) + "\n")
  spm = tmp_path / "sp.model"
  made = subprocess.run([sys.executable, "-m", "llm_jax", "tokenizer", "train", "--input", str(tmp_path / "train.tsv"),
                         "--vocab-size", "1000", "--out", str(spm)], capture_output=True, text=True, timeout=300)
  assert made.returncode == 0, made.stderr[-2000:]
  workdir = tmp_path / "run"
  result = train([sys.executable, "-m", "llm_jax", "train", "--config", str(REPO / "configs/sst2.py"), "--workdir",
                  str(workdir), f"data.source=tsv:{tmp_path / 'train.tsv'}",
                  f"data.eval_source=tsv:{tmp_path / 'test.tsv'}",
                  f"data.test_source=tsv:{tmp_path / 'test.tsv'}", f"data.tokenizer={spm}", "model.vocab_size=1024",
                  "model.max_len=32", "data.seq_len=32", "train.batch_size=16", "train.steps=300", "train.log_every=50",
                  "train.eval_every=100", "train.checkpoint_every=100", "train.eval_batches=4",
                  "optim.warmup_steps=10"], optimized=True)
  assert result.returncode == 0, result.stderr[-3000:]
  labels = [int(line.rsplit("\t", 1)[1]) for line in held_out]
  majority = max(labels.count(0), labels.count(1)) / len(labels)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  test = records[-1]  # the last step again, with the test figures
  assert test["step"] == 300 and test["test_examples"] == len(held_out)
  assert "eval_accuracy" in test and records[-2]["step"] == 300 and "test_accuracy" not in records[-2]
  assert test["test_accuracy"] > majority + 0.05, (test, majority)
  assert f"llm-jax: test accuracy {test['test_accuracy']:.4f}" in result.stdout
