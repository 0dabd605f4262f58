"""The local tasks of `llm-jax eval`: standard figures from files on disk, nothing downloads.

  wikitext2  perplexity of the 62 articles of WikiText-2's raw test split, as lm-eval's `wikitext`
             defines it: each article scored alone (rolling windows), detokenized; words and bytes
             counted in the original article; plus token perplexity
  piqa       acc and acc_norm on PIQA's 1,838 validation questions, lm-eval's prompt
             ("Question: {goal}\\nAnswer:", the two solutions as choices)
  sst2       accuracy on SST-2 sentences (GLUE's dev set): a classifier's own head, or a language
             model zero-shot, by scoring the label words "negative" and "positive" after lm-eval's
             glue prompt
  text:GLOB  perplexity and bits per byte of any text files, each file a document

Paths come from the config's `eval` section (relative ones under eval.data_dir, by default the
../shared/data folder beside the repository). `run` evaluates one workdir and writes
WORKDIR/eval/<task>.json; `reader` checks names and files before any model loads.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pathlib
import re
from typing import Any, Callable

import jax
import numpy as np

from llm_jax.config import DataConfig, EvalConfig
from llm_jax.errors import UserError
from llm_jax.eval import choice, perplexity, scoring

NAMES = ("wikitext2", "piqa", "sst2", "text:GLOB")
SST2_PROMPT = "{}\nQuestion: Is this sentence positive or negative?\nAnswer:"  # lm-eval's glue/sst2
SST2_LABELS = ("negative", "positive")


class EvalError(UserError):
  """A task, data file or model that `llm-jax eval` cannot evaluate as asked."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """How every task of one run evaluates."""

  limit: int | None  # the first N documents, questions or sentences; None for all
  batch_size: int
  overlap: int
  mesh: jax.sharding.Mesh | None


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  files: dict[str, pathlib.Path]  # what the task reads, for the report
  evaluate: Callable[[Any, Settings], dict[str, float]]  # (model handle, settings) -> figures


def data_root(cfg: EvalConfig) -> pathlib.Path:
  """eval.data_dir, else $LLM_JAX_SHARED_DATA, else ../shared/data beside the repository."""
  if cfg.data_dir:
    return pathlib.Path(cfg.data_dir).expanduser()
  env = os.environ.get("LLM_JAX_SHARED_DATA")
  return pathlib.Path(env) if env else pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _path(cfg: EvalConfig, key: str, what: str, *, folder: bool = False) -> pathlib.Path:
  path = pathlib.Path(getattr(cfg, key)).expanduser()
  path = path if path.is_absolute() else data_root(cfg) / path
  if not (path.is_dir() if folder else path.is_file()):
    raise EvalError(f"{path} not found: {what}; set eval.{key}=PATH, or eval.data_dir=DIR where the shared data "
                    f"layout lives (now {data_root(cfg)})")
  return path


def check_names(names: list[str]) -> None:
  """Fails on an unknown task before anything is loaded."""
  if not names:
    raise EvalError(f"--tasks is empty; name one or more of {', '.join(NAMES)}")
  for name in names:
    if name not in NAMES[:-1] and not name.startswith("text:"):
      raise EvalError(f"unknown task {name!r}; choose from {', '.join(NAMES)} (e.g. --tasks wikitext2,piqa or "
                      "--tasks 'text:docs/*.txt')")
    if name == "text:":
      raise EvalError("task 'text:' has no pattern; write text:GLOB, e.g. 'text:docs/*.txt' (quoted for the shell)")


def reader(name: str, cfg: EvalConfig) -> Task:
  """The task `name` over its files, which must exist."""
  if name == "wikitext2":
    path = _path(cfg, "wikitext2", "WikiText-2's raw test split (wiki.test.raw)")
    return Task(name, {"test": path}, lambda model, s: _wikitext2(model, path, s))
  if name == "piqa":
    folder = _path(cfg, "piqa", "a folder with PIQA's valid.jsonl and valid-labels.lst", folder=True)
    files = {"questions": folder / "valid.jsonl", "labels": folder / "valid-labels.lst"}
    for path in files.values():
      if not path.is_file():
        raise EvalError(f"{path} not found: PIQA's folder holds valid.jsonl and valid-labels.lst; set eval.piqa=FOLDER")
    return Task(name, files, lambda model, s: choice.answer(model, piqa_questions(folder)[:s.limit],
                                                            batch_size=s.batch_size, mesh=s.mesh))
  if name == "sst2":
    path = _path(cfg, "sst2", "SST-2's sentence<TAB>label rows (test.tsv)")
    return Task(name, {"test": path}, lambda model, s: _sst2(model, path, s))
  pattern = name[len("text:"):]
  files = sorted(pathlib.Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if pathlib.Path(p).is_file())
  if not files:
    raise EvalError(f"task {name!r}: the pattern matches no file; check it (quote it, so the shell leaves it to "
                    "llm-jax)")
  return Task(name, {"files": pathlib.Path(pattern)}, lambda model, s: _text(model, files, s))


# ----------------------------------------------------------------------------- wikitext2 and text:GLOB


_HEADING = re.compile(r"^ = [^=].* = $")  # an article's title line; sections are " = = Name = = "
_DETOKENIZE: list[tuple[re.Pattern | str, str]] = [  # lm-eval's wikitext_detokenizer, rule for rule, in order
    ("s '", "s'"), (re.compile(r"/' [0-9]/"), r"/'[0-9]/"),
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),
    *((f" {p} ", f"{p} ") for p in ":;.!?,"),
    *((re.compile(rf"\{a}\s*([^\{b}]*?)\s*\{b}"), rf"{a}\1{b}") for a, b in ("()", "[]", "{}")),
    (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'), (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s"),
]


def wikitext_articles(raw: str) -> list[str]:
  """The articles of a WikiText raw file, each from its title line on, line endings as LF.

  The shared copy ends its lines in CRLF and has no blank lines (see its SOURCE.md); LF is what
  the original file and lm-eval's document-level copy use.
  """
  articles: list[list[str]] = []
  for line in raw.replace("\r\n", "\n").splitlines(keepends=True):
    if _HEADING.match(line.rstrip("\n")) or not articles:
      articles.append([])
    articles[-1].append(line)
  return ["".join(lines) for lines in articles]


def wikitext_detokenize(text: str) -> str:
  """WikiText's tokenized spacing undone (" @-@ " -> "-", " , " -> ", ", ...), exactly as lm-eval does it."""
  for pattern, replacement in _DETOKENIZE:
    text = pattern.sub(replacement, text) if isinstance(pattern, re.Pattern) else text.replace(pattern, replacement)
  return text


def _read(path: pathlib.Path) -> str:
  try:
    return path.read_bytes().decode("utf-8")
  except UnicodeDecodeError as e:
    raise EvalError(f"{path} is not UTF-8 text (byte {e.start}); pass text files") from None


def _wikitext2(model: Any, path: pathlib.Path, s: Settings) -> dict[str, float]:
  articles = wikitext_articles(_read(path))[:s.limit]
  lls, tokens = perplexity.rolling(model, [wikitext_detokenize(a) for a in articles], batch_size=s.batch_size,
                                   overlap=s.overlap, mesh=s.mesh)
  return perplexity.figures(lls, tokens, articles)


def _text(model: Any, files: list[pathlib.Path], s: Settings) -> dict[str, float]:
  texts = [_read(path) for path in files[:s.limit]]
  lls, tokens = perplexity.rolling(model, texts, batch_size=s.batch_size, overlap=s.overlap, mesh=s.mesh)
  return perplexity.figures(lls, tokens, texts)


# ----------------------------------------------------------------------------- piqa and sst2


def piqa_rows(folder: pathlib.Path) -> list[dict[str, Any]]:
  """PIQA's questions ({goal, sol1, sol2, label}): line i of valid-labels.lst answers line i of valid.jsonl."""
  lines = [line for line in _read(folder / "valid.jsonl").splitlines() if line.strip()]
  labels = _read(folder / "valid-labels.lst").split()
  if len(lines) != len(labels):
    raise EvalError(f"{folder}: valid.jsonl has {len(lines)} questions but valid-labels.lst {len(labels)} labels; "
                    "restore the two files from the same PIQA release")
  return [{**json.loads(line), "label": int(label)} for line, label in zip(lines, labels)]


def piqa_questions(folder: pathlib.Path) -> list[choice.Question]:
  """lm-eval's piqa prompt, its two solutions as the choices."""
  return [choice.Question(f"Question: {row['goal']}\nAnswer:", (row["sol1"], row["sol2"]), row["label"])
          for row in piqa_rows(folder)]


def _sst2(model: Any, path: pathlib.Path, s: Settings) -> dict[str, float]:
  from llm_jax.data import packing, sources
  data = DataConfig(source=f"tsv:{path}", test_source=f"tsv:{path}", format="classification")
  docs = sources.load(data, "test", num_classes=len(SST2_LABELS))
  sentences = [docs[i] for i in range(min(len(docs), s.limit or len(docs)))]
  cfg = model.config.model
  if not cfg.num_classes:  # a language model, zero-shot
    questions = [choice.Question(SST2_PROMPT.format(x.text), SST2_LABELS, x.label) for x in sentences]
    return {"zero_shot": 1, **choice.answer(model, questions, batch_size=s.batch_size, mesh=s.mesh)}
  # Tokens + eos cut to the run's rows, as its training and test evaluation saw them.
  examples = packing.encode_sentences(sentences, model.tokenizer, min(model.config.data.seq_len, cfg.max_len))
  logits = scoring.classify(model.params, cfg, [e.ids for e in examples], batch_size=s.batch_size, mesh=s.mesh)
  labels = np.array([x.label for x in sentences])
  return {"zero_shot": 0, "acc": float((logits.argmax(axis=-1) == labels).mean()), "examples": len(sentences),
          "truncated": sum(e.cut for e in examples)}
