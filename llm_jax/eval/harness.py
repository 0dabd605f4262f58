"""lm-eval-harness on llm-jax models: an `lm_eval.api.model.LM` registered as `llm-jax`, on the scoring engine.

    import llm_jax.eval.harness  # registers "llm-jax" with lm-eval
    lm_eval.simple_evaluate(model="llm-jax", model_args="path=runs/shakespeare", tasks=["piqa_local"],
                            task_manager=TaskManager(include_path=harness.TASKS_DIR, include_defaults=False))

`llm-jax eval --harness TASKS` runs lm-eval's own command line with this model registered; the
repo's task YAMLs (`harness_tasks/`: `piqa_local`, PIQA over the local files, offline) are
found by name. Requests are tokenized as lm-eval's `hf` model does (this is a `TemplateLM`, and
`tok_encode` adds what transformers adds by default), so both backends score the same tokens;
`loglikelihood` and `loglikelihood_rolling` run batched on the engine, `generate_until` through
`llm_jax.sampling` with the stop strings and the context cut to leave room for max_gen_toks.
Needs the `eval` extra (lm-eval). One process; the batch is split over every local device.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any, Sequence

from llm_jax.errors import UserError

try:
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model
  from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
except ImportError:
  raise UserError("lm-eval-harness is not installed; install the eval extra: pip install -e '.[eval]'") from None

from llm_jax.eval import perplexity, scoring

TASKS_DIR = pathlib.Path(__file__).resolve().parent / "harness_tasks"


@register_model("llm-jax")
class LlmJaxLM(TemplateLM):
  """An llm-jax workdir, checkpoint or export (`path=`), scored `batch_size` rows at a time."""

  def __init__(self, path: str, batch_size: int | str = 32, max_gen_toks: int = 256, overlap: int = 0,
               seed: int = 0, **ignored: Any):
    super().__init__()
    del ignored  # lm-eval passes device and max_batch_size to every model; the mesh decides placement here
    import llm_jax
    from llm_jax import sharding
    from llm_jax.config import MeshConfig
    self._model = llm_jax.load(path)
    if self._model.tokenizer is None:
      raise UserError(f"{path} has no tokenizer beside its checkpoint (tokenizer.json or tokenizer.model), and "
                      f"lm-eval scores text; copy the tokenizer the model was trained with into {path}")
    self._path = str(path)
    self._mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
    text = str(batch_size)
    self._batch_size = 32 if text.startswith("auto") else int(text)
    self._max_gen_toks, self._overlap, self._seed = int(max_gen_toks), int(overlap), int(seed)

  @property
  def tokenizer_name(self) -> str:
    return self._path

  @property
  def eot_token_id(self) -> int:
    return self._model.tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    """What an empty context is conditioned on: a Hugging Face tokenizer's bos, else the eos."""
    prefix = perplexity.prefix_id(self._model.tokenizer)
    return self.eot_token_id if prefix is None else prefix

  @property
  def max_length(self) -> int:
    return self._model.config.model.max_len

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
    tokenizer = self._model.tokenizer
    return tokenizer.encode(string) if add_special_tokens is False else perplexity.encode(tokenizer, string)

  def tok_decode(self, tokens: Sequence[int]) -> str:
    return self._model.tokenizer.decode(tokens)

  def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                            disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
    results = scoring.score(self._model.params, self._model.config.model, [(c, x) for _, c, x in requests],
                            batch_size=self._batch_size, mesh=self._mesh)
    for (key, _, _), result in zip(requests, results):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, result)
    return results

  def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
    """Each text scored alone in rolling windows of the model's context (`scoring.rolling`), as lm-eval's hf
    model does with its prefix token; a model with llm-jax's own tokenizer leaves the first token as context."""
    texts = [request.args[0] for request in requests]
    totals = scoring.rolling(self._model.params, self._model.config.model, [self.tok_encode(t) for t in texts],
                             prefix_id=perplexity.prefix_id(self._model.tokenizer), batch_size=self._batch_size,
                             overlap=self._overlap, mesh=self._mesh)
    for text, total in zip(texts, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
    return totals

  def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
    """Continuations cut at the first stop string; requests with the same generation settings run batched."""
    groups: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
      groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
    out: list[str] = [""] * len(requests)
    for members in groups.values():
      contexts = [requests[i].args[0] for i in members]
      texts = self._generate(contexts, requests[members[0]].args[1])
      for i, context, text in zip(members, contexts, texts):
        out[i] = text
        self.cache_hook.add_partial("generate_until", (context, requests[i].args[1]), text)
    return out

  def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
    from llm_jax import sampling
    kwargs = normalize_gen_kwargs(gen_kwargs, self._max_gen_toks)
    until = [s for s in handle_stop_sequences(kwargs.pop("until", None), eos=None) if s]
    max_new = int(kwargs.pop("max_gen_toks"))
    sample = bool(kwargs.pop("do_sample", False))
    room = self.max_length - max_new
    if room < 1:
      raise UserError(f"max_gen_toks={max_new} leaves no room for a context in the model's max_len={self.max_length}; "
                      "ask for fewer tokens")
    tokenizer = self._model.tokenizer
    prompts = [self.tok_encode(c)[-room:] or [self.prefix_token_id] for c in contexts]
    stop_ids = [tokenizer.encode(s) for s in until]
    texts: list[str] = []
    for start in range(0, len(prompts), self._batch_size):
      completions = sampling.generate(
          self._model.params, self._model.config.model, prompts[start:start + self._batch_size],
          max_new_tokens=max_new, temperature=float(kwargs.get("temperature", 0.0)) if sample else 0.0,
          top_k=int(kwargs.get("top_k") or 0) if sample else 0, top_p=float(kwargs.get("top_p") or 1.0) if sample
          else 1.0, seed=self._seed, eos_id=self.eot_token_id, stop=stop_ids)
      for completion in completions:
        text = tokenizer.decode(completion.tokens)  # the eos, a special, is dropped
        for stop in until:
          text = text.split(stop)[0]
        texts.append(text)
    return texts


def task_argument(names: str) -> str:
  """lm-eval's --tasks value: the repo's own tasks (harness_tasks/NAME.yaml) as their YAML paths, so lm-eval finds
  them beside any --include_path; other names as they are."""
  out = []
  for name in (n.strip() for n in names.split(",") if n.strip()):
    own = TASKS_DIR / f"{name}.yaml"
    out.append(str(own) if own.is_file() else name)
  if not out:
    raise UserError(f"--harness is empty; name lm-eval tasks, e.g. --harness piqa_local (the repo's own: "
                    f"{', '.join(sorted(p.stem for p in TASKS_DIR.glob('*.yaml')))})")
  return ",".join(out)


def run_cli(workdir: str | pathlib.Path, tasks: str, *, include_path: str | None = None, limit: int | None = None,
            batch_size: int = 32, overrides: Sequence[str] = ()) -> int:
  """`llm-jax eval --harness`: lm-eval's own `run` command on this model; its results go to WORKDIR/eval/harness/."""
  if overrides:
    raise UserError(f"--harness takes no overrides ({' '.join(overrides)}); lm-eval reads its own task settings")
  from llm_jax import checkpoint
  checkpoint.find_params(workdir)  # a missing or damaged workdir fails here, in one line
  from lm_eval._cli.harness import HarnessCLI
  argv = ["lm-eval", "run", "--model", "llm-jax", "--model_args", f"path={pathlib.Path(workdir).absolute()}",
          "--tasks", task_argument(tasks), "--batch_size", str(batch_size),
          "--output_path", str(pathlib.Path(workdir).absolute() / "eval" / "harness")]
  argv += ["--include_path", include_path] if include_path else []
  argv += ["--limit", str(limit)] if limit is not None else []
  saved, sys.argv = sys.argv, argv
  try:
    cli = HarnessCLI()
    cli.execute(cli.parse_args())
  finally:
    sys.argv = saved
  return 0
