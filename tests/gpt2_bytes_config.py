"""The tests' base run: GPT-2 style (learned positions, layernorm, GELU) on Tiny Shakespeare's bytes.

Tests load this file and shrink it with overrides (`test_train_loop.tiny_run_args`). It is kept
apart from configs/tiny_shakespeare.py, the main job, so that tuning the main job for its CPU
budget does not change what the tests exercise.
"""

from llm_jax import config as config_lib
from llm_jax.model import presets


def get_config() -> config_lib.Config:
  model = config_lib.replace(
      config_lib.Config(model=presets.get("gpt-10m")),
      model=dict(
          vocab_size=512,  # 260 byte-level ids, padded to a multiple of 128 for fast matmuls
          max_len=256,  # learned positions
      )).model
  return config_lib.Config(
      model=model,
      # Data parallel over every device there is; a CPU host becomes two XLA devices, which ran
      # the step faster than one (llm_jax/distributed.py). A 10M model needs no FSDP.
      mesh=config_lib.MeshConfig(data=-1, fsdp=1, tensor=1, cpu_devices=2),
      optim=config_lib.OptimConfig(
          name="adamw",
          learning_rate=2e-3,  # small model, short run: a high peak
          schedule="cosine",
          warmup_steps=20,
          weight_decay=0.1,
          grad_clip=1.0,
      ),
      data=config_lib.DataConfig(
          source="tfds:tiny_shakespeare",  # train split; eval uses its validation split
          tfds_data_dir="",  # "" = ~/tensorflow_datasets
          tokenizer="byte",
          seq_len=256,
      ),
      train=config_lib.TrainConfig(
          steps=150,
          batch_size=16,  # global: 16 x 256 = 4,096 tokens a step
          log_every=10,
          eval_every=50,
          eval_batches=4,
          checkpoint_every=50,
      ),
      sample=config_lib.SampleConfig(prompt="ROMEO:", max_new_tokens=200, temperature=0.8, top_k=40),
  )
