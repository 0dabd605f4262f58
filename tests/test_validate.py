"""config.validate: signs and ranges of the optimizer and step-loop fields, and evaluation's data.

The command-line side of the same checks (one line, exit 2, nothing written) is in test_bad_input.py.
"""

import math

import pytest

from llm_jax import config as config_lib
from llm_jax.config import ConfigError

LOCAL = dict(source="text:corpus/*.txt")  # a local-file source, which evaluation splits by data.eval_fraction


def validate(**sections):
  config_lib.validate(config_lib.replace(config_lib.Config(), **sections), 1)


@pytest.mark.parametrize("section, key, value, message", [
    ("optim", "learning_rate", -1.0, r"optim.learning_rate=-1.0: expected a finite value >= 0 \(the peak"),
    ("optim", "learning_rate", math.inf, "optim.learning_rate=inf: expected a finite value >= 0"),
    ("optim", "learning_rate", math.nan, "optim.learning_rate=nan: expected a finite value >= 0"),
    ("optim", "b1", 1.0, r"optim.b1=1.0: expected a value in \[0, 1\)"),
    ("optim", "b1", -0.1, r"optim.b1=-0.1: expected a value in \[0, 1\)"),
    ("optim", "b2", 1.5, r"optim.b2=1.5: expected a value in \[0, 1\)"),
    ("optim", "eps", 0.0, "optim.eps=0.0: expected a finite value > 0"),
    ("optim", "weight_decay", -0.1, "optim.weight_decay=-0.1: expected a finite value >= 0"),
    ("optim", "warmup_steps", -1, "optim.warmup_steps=-1: expected a finite value >= 0"),
    ("optim", "min_lr_ratio", 1.5, r"optim.min_lr_ratio=1.5: expected a value in \[0, 1\]"),
    ("optim", "min_lr_ratio", -0.5, r"optim.min_lr_ratio=-0.5: expected a value in \[0, 1\]"),
    ("optim", "decay_fraction", 0.0, r"optim.decay_fraction=0.0: expected a value in \(0, 1\]"),
    ("optim", "decay_fraction", 1.2, r"optim.decay_fraction=1.2: expected a value in \(0, 1\]"),
    ("optim", "grad_clip", -1.0, r"optim.grad_clip=-1.0: expected a finite value >= 0 \(0 disables clipping\)"),
    ("optim", "momentum", 1.0, r"optim.momentum=1.0: expected a value in \[0, 1\)"),
    ("train", "steps", 0, r"train.steps=0: expected a finite value >= 1 \(0 would train nothing"),
    ("train", "log_every", 0, "train.log_every=0: expected a finite value >= 1"),
    ("train", "eval_every", -5, r"train.eval_every=-5: expected a finite value >= 0 \(0 disables evaluation\)"),
    ("train", "checkpoint_every", -1, "train.checkpoint_every=-1: expected a finite value >= 0"),
    ("train", "keep_checkpoints", 0, "train.keep_checkpoints=0: expected a finite value >= 1"),
    ("train", "max_skipped_steps", 0, "train.max_skipped_steps=0: expected a finite value >= 1"),
    ("train", "spike_factor", -2.0, "train.spike_factor=-2.0: expected a finite value >= 0"),
    ("train", "spike_factor", 0.5, "train.spike_factor=0.5: a factor of 1 or less skips ordinary steps"),
    ("train", "early_stop_patience", -1, "train.early_stop_patience=-1: expected a finite value >= 0"),
    ("train", "z_loss", -1e-4, "train.z_loss=-0.0001: expected a finite value >= 0"),
    ("train", "loss_chunk", -8, "train.loss_chunk=-8: expected a finite value >= 0"),
    ("train", "loss_chunk", 100, r"train.loss_chunk=100 does not divide data.seq_len=\d+; use a divisor"),
    ("sample", "max_new_tokens", -1, r"sample.max_new_tokens=-1: expected a finite value >= 0 \(0: the run prints no"),
    ("sample", "temperature", -0.5, "sample.temperature=-0.5: expected a finite value >= 0"),
    ("sample", "top_k", -3, "sample.top_k=-3: expected a finite value >= 0"),
    ("sample", "top_p", 0.0, r"sample.top_p=0.0: expected a value in \(0, 1\]"),
])
def test_out_of_range_values_fail_naming_key_value_and_range(section, key, value, message):
  with pytest.raises(ConfigError, match=message):
    validate(**{section: {key: value}})


@pytest.mark.parametrize("sections", [
    dict(optim=dict(learning_rate=0.0, warmup_steps=0, weight_decay=0.0, grad_clip=0.0, min_lr_ratio=1.0,
                    decay_fraction=1.0, b1=0.0, b2=0.0, momentum=0.0)),
    dict(train=dict(steps=1, log_every=1, eval_every=0, eval_batches=0, checkpoint_every=0, keep_checkpoints=1)),
    dict(data=dict(eval_fraction=0.0, **LOCAL), train=dict(eval_every=0)),  # no evaluation: nothing held out
    dict(data=dict(eval_fraction=0.0, eval_source="text:held_out/*.txt", **LOCAL)),  # its own evaluation data
    dict(data=dict(eval_fraction=0.0)),  # TFDS: evaluation reads the dataset's validation split
], ids=["optim-bounds", "train-bounds", "eval-off", "eval-source", "tfds"])
def test_values_on_the_bounds_are_accepted(sections):
  validate(**sections)


def test_eval_batches_must_be_positive_while_evaluating():
  with pytest.raises(ConfigError, match=r"train.eval_batches=0: expected a positive count while evaluation is on "
                                        r"\(or set train.eval_every=0"):
    validate(train=dict(eval_batches=0))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_eval_fraction_of_local_files_must_hold_something_out(fraction):
  with pytest.raises(ConfigError, match=rf"data.eval_fraction={fraction}: evaluation holds out that share of "
                                        r"text:corpus/\*.txt, so it must lie strictly between 0 and 1"):
    validate(data=dict(eval_fraction=fraction, **LOCAL))
  validate(data=dict(eval_fraction=0.5, **LOCAL))


@pytest.mark.parametrize("dtype, message", [
    ("float16", r"--dtype float16: expected one of float32, bfloat16 \(the parameter dtypes llm_jax.load"),
    ("bfloat17", "--dtype bfloat17: expected one of float32, bfloat16"),
    ("int8", r"--dtype int8: integer weights are quantization; pass --quantize int8 \(and --dtype one of"),
])
def test_export_dtype_must_be_one_the_loader_reads(dtype, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.check_export_dtype(dtype)
  for ok in (None, *config_lib._CHOICES["model.param_dtype"]):
    config_lib.check_export_dtype(ok)
