"""A Llama-3-style 1B model (GQA, RoPE theta 500k, tied head) for a GPU node or a TPU slice.

  llm-jax train --config configs/llama_1b.py --workdir runs/llama1b data.source=text:'corpus/*.txt'

FSDP shards every weight over all devices; for 8+ devices with fast links try
mesh.fsdp=-1 mesh.tensor=2.
"""

from llm_jax import config as config_lib
from llm_jax.model import presets


def get_config() -> config_lib.Config:
  return config_lib.Config(
      model=config_lib.replace(config_lib.Config(model=presets.get("llama-1b")), model=dict(
          dtype="bfloat16",
          scan_layers=True,
          remat="full",  # 16 layers x 2048 tokens of activations would not fit otherwise
      )).model,
      mesh=config_lib.MeshConfig(data=1, fsdp=-1, tensor=1),
      optim=config_lib.OptimConfig(learning_rate=3e-4, warmup_steps=2000, schedule="wsd", decay_fraction=0.2,
                                   weight_decay=0.1, b2=0.95, grad_clip=1.0),
      data=config_lib.DataConfig(source="tfds:tiny_shakespeare", tokenizer="tokenizers/spm32k.model",
                                 seq_len=2048, worker_count=4, prefetch=4),
      train=config_lib.TrainConfig(steps=50000, batch_size=128, log_every=50, eval_every=2000, eval_batches=20,
                                   checkpoint_every=1000),
  )
