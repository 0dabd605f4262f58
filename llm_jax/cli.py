"""The `llm-jax` command: parse arguments, then call the library.

Every subcommand is a few lines that turn flags into a call of an importable function, so all
behaviour is testable without this module. Heavy imports happen inside the handlers: `llm-jax
--help` stays fast and one command never pays for another's dependencies.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from llm_jax import compile_cache, host_memory
from llm_jax import config as config_lib
from llm_jax.errors import UserError, exit_interrupted


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
  from llm_jax.train import memory
  config = _load_config(args)
  print(json.dumps({**stats.summarize(config), "memory": memory.plan(config)}, indent=2))
  return 0


def _cmd_tokenizer(args: argparse.Namespace) -> int:
  from llm_jax.data import tokenizer
  path = tokenizer.train_sentencepiece(args.input, args.vocab_size, args.out, model_type=args.model_type)
  print(f"wrote {path}")
  return 0


def _cmd_data(args: argparse.Namespace) -> int:
  from llm_jax.data import tfds_source
  print(tfds_source.prepare(args.name, from_file=args.from_file, data_dir=args.data_dir))
  return 0


def _cmd_data_tokenize(args: argparse.Namespace) -> int:
  from llm_jax.data import clean, pretokenize
  data = config_lib.DataConfig(source=args.source, text_field=args.text_field, text_split=args.text_split,
                               chunk_chars=args.chunk_chars, tfds_data_dir=args.tfds_data_dir)
  options = clean.CleanOptions(args.normal_form, not args.keep_control, args.min_chars, args.max_chars,
                               not args.keep_duplicates, args.near_threshold) if args.clean else None
  manifest = pretokenize.tokenize(data, args.tokenizer, args.out, workers=args.workers, options=options,
                                  examples_per_shard=args.examples_per_shard)
  print(json.dumps({"out": args.out, **manifest["totals"], "shards": len(manifest["shards"])}))
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
  if args.speculate is not None and not args.draft_workdir:
    raise config_lib.ConfigError("--speculate sets the draft model's tokens per round; add --draft-workdir DIR")
  model = llm_jax.load(args.workdir)
  speculative = {}
  if args.draft_workdir:
    draft = llm_jax.load(args.draft_workdir)
    speculative = {"draft": (draft.params, draft.config.model), "speculate": args.speculate or 4}
  if "" in prompts and (args.raw or model.config.data.format == "text"):  # a template gives it text around it
    print("llm-jax: note: an empty prompt is conditioned on the bos token alone, which models trained by llm-jax "
          "never see; give them some text, e.g. a newline", file=sys.stderr)
  results = model.generate(
      prompts, raw=args.raw, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
      top_p=args.top_p, num_beams=args.num_beams, seed=args.seed, return_details=args.json, **speculative)
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
  if args.quantize_embeddings and args.quantize == "none":
    raise config_lib.ConfigError("--quantize-embeddings quantizes along with the projections; add --quantize int8")
  workdir.refuse_run_folder(args.out, "export")  # before anything is written, and before the heavy imports
  from llm_jax import checkpoint
  print(checkpoint.export_params(args.workdir, args.out, dtype=args.dtype, merge_lora=args.merge_lora,
                                 quantize=args.quantize, quantize_embeddings=args.quantize_embeddings))
  return 0


def _cmd_serve(args: argparse.Namespace) -> int:
  try:
    from llm_jax.serve import server
  except ImportError as e:
    raise UserError(f"llm-jax serve needs the serve extra ({e.name} is missing); pip install 'llm-jax[serve]'") from None
  server.serve(args.workdir, host=args.host, port=args.port, slots=args.slots)
  return 0


def _cmd_eval(args: argparse.Namespace) -> int:
  if args.harness is not None:
    from llm_jax.eval import harness
    return harness.run_cli(args.workdir, args.harness, include_path=args.include_path, limit=args.limit,
                           batch_size=args.batch_size, overrides=args.overrides)
  from llm_jax.eval import runner
  runner.run(args.workdir, [t.strip() for t in args.tasks.split(",") if t.strip()], limit=args.limit,
             batch_size=args.batch_size, overrides=args.overrides)
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
  d = data.add_parser("tokenize", help="tokenize a source once into ArrayRecord shards (train with data.source=tokens:DIR)")
  d.add_argument("--source", required=True, help="text:GLOB, jsonl:GLOB, tfds:NAME[:SPLIT] or hf:PATH_OR_NAME[:SPLIT]")
  d.add_argument("--tokenizer", required=True, help="byte, a sentencepiece .model, or a Hugging Face tokenizer.json")
  d.add_argument("--out", required=True, help="an empty folder, or one an interrupted run left (it resumes)")
  d.add_argument("--workers", type=int, default=1, help="processes tokenizing parts (files) in parallel")
  d.add_argument("--chunk-chars", type=int, default=8192,
                 help="documents longer than this are cut into pieces, as data.chunk_chars does (32 x data.seq_len)")
  d.add_argument("--text-field", default="text", help="jsonl:, tfds: and hf: sources: the field holding the text")
  d.add_argument("--text-split", default="file", choices=("file", "blank_line"), help="text: documents")
  d.add_argument("--tfds-data-dir", default="")
  d.add_argument("--examples-per-shard", type=int, default=100_000, help="tfds: and hf: sources")
  d.add_argument("--clean", action="store_true", help="normalize, remove control characters, drop documents out of "
                 "the length range, exact and near duplicates (each counted in the manifest)")
  d.add_argument("--normal-form", default="NFC", choices=("NFC", "NFKC", "none"))
  d.add_argument("--keep-control", action="store_true", help="--clean without control-character removal")
  d.add_argument("--min-chars", type=int, default=1)
  d.add_argument("--max-chars", type=int, default=0, help="0: no upper bound")
  d.add_argument("--keep-duplicates", action="store_true", help="--clean without exact deduplication")
  d.add_argument("--near-threshold", type=float, default=0.8,
                 help="MinHash Jaccard similarity from which a document is a near duplicate; 0 keeps them")
  d.set_defaults(handler=_cmd_data_tokenize)

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
  p.add_argument("--draft-workdir", help="a smaller model with the same tokenizer that proposes tokens for the "
                 "target to check (speculative decoding: the same output, faster)")
  p.add_argument("--speculate", type=int, help="with --draft-workdir: draft tokens per target forward pass (default 4)")
  p.add_argument("--raw", action="store_true",
                 help="use prompts as they are, not through the run's instruction template (data.format alpaca or chat)")
  p.set_defaults(handler=_cmd_generate)

  p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching (the serve extra)")
  p.add_argument("--workdir", required=True, help="a run's workdir, a checkpoint or an export (int8 too)")
  p.add_argument("--host", default="127.0.0.1", help="the address to listen on (127.0.0.1: this machine only)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--slots", type=int, default=8, help="requests decoded together; more wait for a free slot")
  p.set_defaults(handler=_cmd_serve)

  p = sub.add_parser("eval", help="score a model on local tasks (wikitext2, piqa, sst2, text:GLOB) or through "
                     "lm-eval-harness; writes WORKDIR/eval/<task>.json")
  p.add_argument("--workdir", required=True, help="a run's workdir, a checkpoint or an export")
  group = p.add_mutually_exclusive_group(required=True)
  group.add_argument("--tasks", help="comma-separated: wikitext2, piqa, sst2, text:GLOB")
  group.add_argument("--harness", metavar="TASK[,TASK...]",
                     help="lm-eval-harness tasks, run by lm-eval's own CLI on this model (the eval extra)")
  p.add_argument("--include-path", help="--harness: a folder of lm-eval task YAMLs beside the repo's own (piqa_local)")
  p.add_argument("--limit", type=int, help="the first N documents, questions or sentences of each task")
  p.add_argument("--batch-size", type=int, default=32, help="rows scored at once (the figures do not depend on it)")
  p.add_argument("overrides", nargs="*", metavar="section.key=value", help="eval.* paths, model run-time fields")
  p.set_defaults(handler=_cmd_eval)

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
  p.add_argument("--quantize", choices=("none", "int8"), default="none",
                 help="int8: weight-only int8 projections, one scale per output channel (for inference)")
  p.add_argument("--quantize-embeddings", action="store_true",
                 help="with --quantize: the token embedding and output head in int8 too")
  p.set_defaults(handler=_cmd_export)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.handler(args)
  except UserError as e:  # input the user can fix: one line, no traceback
    print(f"llm-jax: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:  # Ctrl-C outside the trainer's loop (whose handler ends the process itself)
    exit_interrupted()


def run() -> None:
  """The `llm-jax` program: `main` in a process whose malloc asks for huge pages (host_memory), with a persistent
  compilation cache (compile_cache)."""
  host_memory.reexec_with_huge_pages()
  compile_cache.use_default()
  sys.exit(main())


if __name__ == "__main__":
  run()
