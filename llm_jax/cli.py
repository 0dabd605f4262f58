"""The `llm-jax` command: parse arguments, then call the library.

Every subcommand is a few lines that turn flags into a call of an importable function, so all
behaviour is testable without this module. Heavy imports happen inside the handlers: `llm-jax
--help` stays fast and one command never pays for another's dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from llm_jax import config as config_lib
from llm_jax import host_memory
from llm_jax.errors import UserError


def _load_config(args: argparse.Namespace) -> config_lib.Config:
  if getattr(args, "preset", None):
    from llm_jax.model import presets
    base = config_lib.Config(model=presets.get(args.preset))
  elif getattr(args, "config", None):
    base = config_lib.load_file(args.config)
  else:
    raise config_lib.ConfigError("pass --config configs/NAME.py (or --preset NAME)")
  return config_lib.override(base, args.overrides)


def _cmd_train(args: argparse.Namespace) -> int:
  config = _load_config(args)  # config errors first, before the heavy imports
  from llm_jax.train import loop
  loop.train(config, args.workdir, fresh=args.fresh, profile=args.profile)
  return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
  from llm_jax.model import stats
  print(json.dumps(stats.summarize(_load_config(args)), indent=2))
  return 0


def _cmd_tokenizer(args: argparse.Namespace) -> int:
  from llm_jax.data import tokenizer
  path = tokenizer.train_sentencepiece(args.input, args.vocab_size, args.out, model_type=args.model_type)
  print(f"wrote {path}")
  return 0


def _cmd_data(args: argparse.Namespace) -> int:
  from llm_jax.data import sources
  print(sources.prepare(args.name, from_file=args.from_file, data_dir=args.data_dir))
  return 0


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
  """The prompts of `generate`: --prompt, then each non-blank line of --prompts-file.

  A file that cannot serve (missing, a folder, not UTF-8 text, only blank lines) is named with
  what is wrong with it, before the model is loaded.
  """
  prompts = [prompt] if prompt is not None else []
  if prompts_file is not None:
    path = pathlib.Path(prompts_file)
    if path.is_dir():
      raise config_lib.ConfigError(f"--prompts-file {path} is a folder; pass a text file with one prompt per line")
    try:
      data = path.read_bytes()
    except FileNotFoundError:
      raise config_lib.ConfigError(f"--prompts-file {path}: no such file; check the path") from None
    except OSError as e:
      raise config_lib.ConfigError(f"--prompts-file {path} cannot be read ({e.strerror}); check its "
                                   "permissions") from None
    nul = data.find(b"\0")
    if nul >= 0:
      raise config_lib.ConfigError(f"--prompts-file {path} is binary (a NUL byte at offset {nul}); pass a text file "
                                   "with one prompt per line")
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError as e:
      raise config_lib.ConfigError(f"--prompts-file {path} is not UTF-8 text (byte {e.start}: {e.reason}); pass a "
                                   "text file with one prompt per line") from None
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
      raise config_lib.ConfigError(f"--prompts-file {path} holds no prompt (every line is blank); write one prompt "
                                   "per line")
    prompts += lines
  if not prompts:
    raise config_lib.ConfigError("pass --prompt TEXT or --prompts-file FILE")
  return prompts


def _cmd_generate(args: argparse.Namespace) -> int:
  import llm_jax
  prompts = read_prompts(args.prompt, args.prompts_file)
  model = llm_jax.load(args.workdir)
  if "" in prompts and (args.raw or model.config.data.format == "text"):  # a template gives it text around it
    print("llm-jax: note: an empty prompt is conditioned on the bos token alone, which models trained by llm-jax "
          "never see; give them some text, e.g. a newline", file=sys.stderr)
  results = model.generate(
      prompts, raw=args.raw, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
      top_p=args.top_p, num_beams=args.num_beams, seed=args.seed, return_details=args.json)
  for result in results:
    print(json.dumps(result) if args.json else result)
  return 0


def _cmd_convert(args: argparse.Namespace) -> int:
  from llm_jax.interop import hf
  if bool(args.from_hf) == bool(args.to_hf):
    raise config_lib.ConfigError("pass exactly one of --from-hf DIR or --to-hf WORKDIR")
  if args.from_hf:
    print(hf.import_hf(args.from_hf, args.out))
  else:
    print(hf.export_hf(args.to_hf, args.out))
  return 0


def _cmd_export(args: argparse.Namespace) -> int:
  from llm_jax import workdir
  config_lib.check_export_dtype(args.dtype)
  workdir.refuse_run_folder(args.out, "export")  # before anything is written, and before the heavy imports
  from llm_jax import checkpoint
  print(checkpoint.export_params(args.workdir, args.out, dtype=args.dtype, merge_lora=args.merge_lora))
  return 0


def _cmd_plot(args: argparse.Namespace) -> int:
  from llm_jax.train import plot
  out = args.out or (pathlib.Path(args.workdirs[0]) / "curves.png" if len(args.workdirs) == 1 else "curves.png")
  print(plot.write(args.workdirs, out))
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="llm-jax", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("train", help="pretrain or fine-tune as the config says; resumes from DIR's checkpoints")
  p.add_argument("--config", required=True, help="configs/NAME.py (or a workdir's config.json)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--fresh", action="store_true", help="discard DIR's checkpoints and config and start over")
  p.add_argument("--profile", action="store_true",
                 help="a jax.profiler trace of 5 steps after compilation in DIR/profile/ (or train.profile_steps=START:END)")
  p.add_argument("overrides", nargs="*", metavar="section.key=value")
  p.set_defaults(handler=_cmd_train)

  p = sub.add_parser("inspect", help="parameter count, FLOPs per token, bytes and each parameter's sharding on the config's mesh (no allocation)")
  group = p.add_mutually_exclusive_group(required=True)
  group.add_argument("--config")
  group.add_argument("--preset")
  p.add_argument("overrides", nargs="*", metavar="section.key=value")
  p.set_defaults(handler=_cmd_inspect)

  p = sub.add_parser("tokenizer", help="tokenizer tools")
  tok = p.add_subparsers(dest="action", required=True)
  t = tok.add_parser("train", help="train a sentencepiece model that round-trips any UTF-8 text")
  t.add_argument("--input", nargs="+", required=True, metavar="GLOB")
  t.add_argument("--vocab-size", type=int, required=True)
  t.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
  t.add_argument("--out", required=True, help="path of the .model file to write")
  t.set_defaults(handler=_cmd_tokenizer)

  p = sub.add_parser("data", help="dataset tools")
  data = p.add_subparsers(dest="action", required=True)
  d = data.add_parser("prepare", help="build a TFDS dataset offline from a local copy of its source file")
  d.add_argument("name", help="dataset name, e.g. tiny_shakespeare")
  d.add_argument("--from-file", required=True)
  d.add_argument("--data-dir", required=True)
  d.set_defaults(handler=_cmd_data)

  p = sub.add_parser("generate", help="sample text from a trained or converted model")
  p.add_argument("--workdir", required=True, help="a run's workdir or a checkpoint")
  p.add_argument("--prompt", help="text to continue; an empty one is conditioned on the bos token alone")
  p.add_argument("--prompts-file", help="one prompt per line")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--num-beams", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", action="store_true", help="one JSON object per prompt: text, token ids, log-probs")
  p.add_argument("--raw", action="store_true",
                 help="use prompts as they are, not through the run's instruction template (data.format alpaca or chat)")
  p.set_defaults(handler=_cmd_generate)

  p = sub.add_parser("plot", help="draw the loss (against steps and tokens), learning rate and tokens/s of runs")
  p.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="one or more runs, overlaid and named by folder")
  p.add_argument("--out", help="the PNG to write (default: WORKDIR/curves.png for one run, ./curves.png for several)")
  p.set_defaults(handler=_cmd_plot)

  p = sub.add_parser("convert", help="Hugging Face weights in or out")
  p.add_argument("--from-hf", help="a local transformers model folder")
  p.add_argument("--to-hf", help="an llm-jax workdir")
  p.add_argument("--out", required=True)
  p.set_defaults(handler=_cmd_convert)

  p = sub.add_parser("export", help="write a parameters-only checkpoint")
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--dtype", default=None, help="cast parameters: float32 or bfloat16 (what llm_jax.load reads)")
  p.add_argument("--merge-lora", action="store_true", help="a LoRA run: write its base with the adapters merged in")
  p.set_defaults(handler=_cmd_export)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.handler(args)
  except UserError as e:  # input the user can fix: one line, no traceback
    print(f"llm-jax: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:  # a second Ctrl-C: the trainer's first one would have saved and exited 0
    print("llm-jax: interrupted; checkpoints that were complete are intact (an unfinished save is removed when "
          "the run resumes)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)  # at once, as asked: background save threads would print their own tracebacks at shutdown


def run() -> None:
  """The `llm-jax` program: `main` in a process whose malloc asks for huge pages (host_memory)."""
  host_memory.reexec_with_huge_pages()
  sys.exit(main())


if __name__ == "__main__":
  run()
