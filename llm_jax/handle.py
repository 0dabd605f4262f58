"""`llm_jax.load(path)`: a trained or converted model, ready for notebooks and eval scripts.

    m = llm_jax.load("runs/shakespeare")
    m.generate(["ROMEO:"], max_new_tokens=50)
    m.logits([[1, 2, 3]])  # np.ndarray [B, L, V], float32
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import checkpoint
from llm_jax import config as config_lib
from llm_jax.model import transformer

if TYPE_CHECKING:
  from llm_jax.data import tokenizer as tokenizer_lib  # imported where a tokenizer is read


@dataclasses.dataclass
class Model:
  """Parameters, config and tokenizer of one model; no optimizer state."""

  config: config_lib.Config
  params: Any
  tokenizer: Any = None  # llm_jax.data.tokenizer.Tokenizer, when the workdir holds one

  @functools.cached_property
  def _forward(self):
    return jax.jit(functools.partial(transformer.forward, cfg=self.config.model))

  def logits(self, token_ids: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """Float32 logits [B, L, V] of equal-length rows of token ids."""
    tokens = jnp.asarray(np.asarray(token_ids, dtype=np.int32))
    return np.asarray(self._forward(self.params, tokens_BL=tokens))

  def log_likelihood(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, bool]:
    """(log p(continuation | context), whether greedy decoding would produce the continuation).

    One request of `log_likelihoods`: together they may not exceed model.max_len + 1 tokens.
    """
    return self.log_likelihoods([(context, continuation)])[0]

  def log_likelihoods(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 32,
                      truncate: bool = False) -> list[tuple[float, bool]]:
    """`log_likelihood` of many (context, continuation) requests through the scoring engine (batched,
    length-bucketed: eval/scoring.py). With `truncate` a request longer than the model's context keeps
    its last tokens, as lm-eval does; without, it is refused."""
    from llm_jax.eval import scoring
    return scoring.score(self.params, self.config.model, requests, batch_size=batch_size, truncate=truncate)

  def prompt_text(self, text: str) -> str:
    """`text` as the run's instruction template puts a user turn before its response (data.format alpaca
    or chat, see `templates.render_prompt`), so the model answers it; other runs take it as it is."""
    from llm_jax.data import templates
    template = templates.from_config(self.config.data, self.tokenizer)
    return text if template is None else templates.render_prompt(template, text)

  def generate(self, prompts: Sequence[str], raw: bool = False, **kwargs) -> list:
    """Texts (or, with return_details=True, dicts with ids and log-probs) for each prompt.

    A run fine-tuned on instructions gets each prompt through its template first (`prompt_text`),
    unless `raw`. Keyword arguments: max_new_tokens, temperature, top_k, top_p, num_beams, seed, stop.
    """
    from llm_jax import sampling
    if self.tokenizer is None:
      raise checkpoint.CheckpointError("this checkpoint has no tokenizer file beside it; generate from token ids "
                                       "with llm_jax.sampling.generate instead")
    prompts = list(prompts) if raw else [self.prompt_text(p) for p in prompts]
    return sampling.generate_text(self.params, self.config.model, self.tokenizer, prompts, **kwargs)


def find_tokenizer(path: pathlib.Path) -> tokenizer_lib.Tokenizer | None:
  """The tokenizer saved beside a checkpoint: in the folder itself or in its run's workdir."""
  for folder in (path, *path.parents[:3]):
    if (folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file():
      from llm_jax.data import tokenizer
      return tokenizer.load_from_workdir(folder)
  return None


def load(path: str | pathlib.Path, model: config_lib.ModelConfig | None = None) -> Model:
  """Restores a workdir's latest checkpoint, one step's checkpoint or an export, parameters only.

  `model` may change run-time fields (compute dtype, scan layout); the architecture must match.
  By default the layers come unscanned: decoding a token then reads each layer's weights in
  place instead of slicing them out of a stack, about twice as fast on CPU (docs/sampling.md).
  """
  params_dir, saved = checkpoint.find_params(path)  # once: it checks the files and reports what it skips
  model = model or dataclasses.replace(saved.model, scan_layers=False)
  params, config = checkpoint.restore_params(params_dir.parent, model)
  return Model(config=config, params=params, tokenizer=find_tokenizer(pathlib.Path(path).absolute()))
