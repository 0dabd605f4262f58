"""The main job: a 0.9M-parameter Llama-style model on Tiny Shakespeare, bytes as tokens.

Sized for a 2-core CPU: 1-4 minutes of `llm-jax train` (by the machine) take the validation loss
from 5.6 to about 1.61 nats per byte, and the sample has words, line breaks and speaker names (README):

  llm-jax train --config configs/tiny_shakespeare.py --workdir runs/shakespeare

Offline, first build the TFDS dataset from a local copy of its input.txt:

  llm-jax data prepare tiny_shakespeare --from-file ../shared/data/tiny_shakespeare/input.txt \
      --data-dir ~/tensorflow_datasets

Why these sizes (each measured on a 2-core AMD EPYC, validation loss over 49k bytes): in a few
minutes of CPU a small model that sees many tokens beats a large one that sees few (the
10.9M-parameter gpt-10m stopped at 2.46). Rotary positions learn far faster than learned ones:
the same sizes as GPT-2 (learned positions, layernorm, GELU) reached 1.84 where this reached
1.56 (1,000 steps of 16 x 128). At a fixed budget of tokens, 128 positions beat 256 (1.66 against
1.73), 8 rows a step beat 16 at twice the steps (1.65 against 1.66, in less time), and a peak
learning rate of 2e-3 beat 3e-3 and 6e-3. For a quick debug run add overrides, e.g.
`model.num_layers=2 train.steps=20`.
"""

from llm_jax import config as config_lib


def get_config() -> config_lib.Config:
  return config_lib.Config(
      model=config_lib.ModelConfig(
          vocab_size=384,  # 260 byte-level ids, padded to a multiple of 128 for fast matmuls
          max_len=256,  # trained on 128 (data.seq_len); rotary positions leave room to fine-tune longer
          num_layers=4,
          num_heads=4,
          num_kv_heads=4,
          d_model=128,
          d_ff=384,  # SwiGLU: three 128 x 384 matrices, the parameters of a 4 x 128 GELU MLP
          norm="rmsnorm",
          position="rope",
          mlp="swiglu",
          use_bias=False,
          # Scanned, with every layer recomputed in the backward pass: on CPU that keeps XLA's
          # temporaries for a step at 25 MiB (66 MiB unrolled without remat, 39 MiB scanned with
          # save_matmuls), under the 32 MiB above which glibc maps them afresh every step, so the
          # step takes 0 page faults instead of 17,000 and needs no huge pages. The whole job took
          # 0.92 of the time of unrolled layers without remat (docs/benchmarks.md).
          scan_layers=True,
          remat="full",
      ),
      # Data parallel over every device there is. A CPU host stays one XLA device: two ran this job's
      # step about 6% faster on one 2-core machine and slower on another (docs/benchmarks.md), so the
      # default is the setting that does not depend on the processor; `mesh.cpu_devices=2` tries it.
      mesh=config_lib.MeshConfig(data=-1, fsdp=1, tensor=1),
      optim=config_lib.OptimConfig(
          name="adamw",
          learning_rate=2e-3,  # small model, short run: a high peak
          schedule="cosine",
          warmup_steps=50,
          min_lr_ratio=0.01,
          b2=0.99,  # few tokens a step: a longer average of the squared gradients
          weight_decay=0.1,
          grad_clip=1.0,
      ),
      data=config_lib.DataConfig(
          source="tfds:tiny_shakespeare",  # train split; eval uses its validation split
          tfds_data_dir="",  # "" = ~/tensorflow_datasets
          tokenizer="byte",
          seq_len=128,
      ),
      train=config_lib.TrainConfig(
          steps=1800,
          batch_size=8,  # global: 8 x 128 = 1,024 tokens a step, 1.8M in the run (about 1.8 epochs)
          log_every=50,
          eval_every=450,
          eval_batches=48,  # 49k of the validation split's 56k bytes, the same ones each time
          checkpoint_every=450,
      ),
      # 200 new bytes run past the 128 positions the model was trained on (max_len is 256): rotary
      # positions carry it on to the next speaker, a little less well than inside 128.
      sample=config_lib.SampleConfig(prompt="ROMEO:", max_new_tokens=200, temperature=0.8, top_k=40),
  )
