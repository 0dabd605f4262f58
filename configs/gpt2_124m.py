"""GPT-2 124M for a GPU node or a TPU slice: bf16 compute, scanned layers, FSDP over all devices.

  llm-jax tokenizer train --input 'corpus/*.txt' --vocab-size 32000 --out tokenizers/spm32k.model
  llm-jax train --config configs/gpt2_124m.py --workdir runs/gpt2 data.source=text:'corpus/*.txt'

On several hosts run the same command on each (TPU VMs and SLURM are detected; elsewhere set
mesh.coordinator_address, mesh.num_processes and mesh.process_id).
"""

from llm_jax import config as config_lib
from llm_jax.model import presets


def get_config() -> config_lib.Config:
  return config_lib.Config(
      model=config_lib.replace(config_lib.Config(model=presets.get("gpt2-124m")), model=dict(
          vocab_size=50304,  # GPT-2's 50257 padded to a multiple of 128 (and of any tensor-parallel size)
          dtype="bfloat16",  # compute; parameters and optimizer state stay float32
          scan_layers=True,
          remat="save_matmuls",
      )).model,
      mesh=config_lib.MeshConfig(data=1, fsdp=-1, tensor=1),
      optim=config_lib.OptimConfig(learning_rate=6e-4, warmup_steps=700, schedule="cosine", weight_decay=0.1,
                                   b2=0.95, grad_clip=1.0),
      data=config_lib.DataConfig(source="tfds:tiny_shakespeare", tokenizer="tokenizers/spm32k.model",
                                 seq_len=1024, worker_count=4, prefetch=4),
      train=config_lib.TrainConfig(steps=20000, batch_size=256, log_every=50, eval_every=1000, eval_batches=20,
                                   checkpoint_every=1000),
  )
