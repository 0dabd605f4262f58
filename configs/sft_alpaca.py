"""Instruction SFT on the Alpaca demo (999 English records), the loss on the responses only.

Fine-tunes a pretrained model: a run of ours, or a Hugging Face model converted with `llm-jax
convert`. With train.init_from, the architecture and the tokenizer come from that checkpoint; the
model section below is the fallback (gpt-10m on bytes, 256 positions):

  llm-jax train --config configs/tiny_shakespeare.py --workdir runs/shakespeare
  llm-jax train --config configs/sft_alpaca.py --workdir runs/sft train.init_from=runs/shakespeare
  llm-jax generate --workdir runs/sft --prompt "Give three tips for staying healthy."

`generate` renders the prompt through the run's template (Alpaca's "### Instruction: ... ###
Response:"), so the model answers and stops at eos; `--raw` passes the prompt as it is. 5% of the
records (50, evenly spaced) are held out: eval_loss is the loss on their responses.

A converted model with a longer context and a chat template of its own:

  llm-jax convert --from-hf PATH/Qwen2-0.5B-Instruct --out runs/qwen
  llm-jax train --config configs/sft_alpaca.py --workdir runs/sft-qwen train.init_from=runs/qwen \
      data.seq_len=1024 data.template=tokenizer

Chinese: data.source=json:../shared/data/instruct/alpaca_zh_demo.json. At 256 bytes most records
are longer than a row: each is cut from the prompt side and the count is logged at start (see
docs/data.md); a tokenizer of more than a byte a token keeps far more of them whole.

For a quick debug run add overrides, e.g. `model.num_layers=2 train.steps=10 train.eval_every=5`.
"""

from llm_jax import config as config_lib
from llm_jax.model import presets


def get_config() -> config_lib.Config:
  model = config_lib.replace(
      config_lib.Config(model=presets.get("gpt-10m")),
      model=dict(vocab_size=512, max_len=256)).model  # bytes; without init_from it trains from scratch
  return config_lib.Config(
      model=model,
      mesh=config_lib.MeshConfig(data=-1, fsdp=1, tensor=1, cpu_devices=2),
      optim=config_lib.OptimConfig(
          name="adamw",
          learning_rate=3e-4,  # a fine-tune: well below the 2e-3 of pretraining
          schedule="cosine",
          warmup_steps=20,
          weight_decay=0.0,  # a few hundred steps from a pretrained start: no pull towards zero
          grad_clip=1.0,
      ),
      data=config_lib.DataConfig(
          source="json:../shared/data/instruct/alpaca_en_demo.json",
          format="alpaca",  # records of instruction, input, output
          template="alpaca",  # Stanford Alpaca's prompt; "chatml", or "tokenizer" for a converted chat model's own
          eval_fraction=0.05,  # 50 of the 999 records, the same ones every run
          tokenizer="byte",  # a run of ours or a converted model brings its own through init_from
          seq_len=256,
      ),
      train=config_lib.TrainConfig(
          steps=180,  # about three passes over the 949 training records at 16 rows a step
          batch_size=16,
          log_every=10,
          eval_every=30,
          eval_batches=3,  # 48 rows: about one pass over the 50 held-out records
          checkpoint_every=60,
          init_from="",  # set on the command line: train.init_from=WORKDIR
      ),
      # The trainer's samples go through the run's template, as `llm-jax generate` prompts do.
      sample=config_lib.SampleConfig(prompt="Give three tips for staying healthy.", max_new_tokens=120,
                                     temperature=0.0),
  )
