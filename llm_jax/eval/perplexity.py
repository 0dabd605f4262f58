"""Perplexity of whole documents: rolling log-likelihood through the engine, and the figures lm-eval reports.

With ll the summed natural-log likelihood of every document (each scored alone, `scoring.rolling`):

  token_perplexity = exp(-sum ll / sum predicted tokens)
  word_perplexity  = exp(-sum ll / sum words)        words as lm-eval counts them: re.split(r"\\s+", text)
  byte_perplexity  = exp(-sum ll / sum UTF-8 bytes)
  bits_per_byte    = -sum ll / sum bytes / ln 2

Words and bytes are counted in the text as given (lm-eval's wikitext counts the original article,
then scores it detokenized), so figures of models with different tokenizers compare.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax

from llm_jax.eval import scoring


def prefix_id(tokenizer: Any) -> int | None:
  """The token a document (or an empty context) is conditioned on, as lm-eval's `hf` model does: a Hugging
  Face tokenizer's bos (its eos where it has none). None for llm-jax's own tokenizers: their models never see
  a token before a document's first (see `scoring.rolling_windows`), so that first token is context only."""
  from llm_jax.data import hf_tokenizer
  return tokenizer.bos_id if isinstance(tokenizer, hf_tokenizer.HFTokenizer) else None


def encode(tokenizer: Any, text: str) -> list[int]:
  """The ids of `text` as lm-eval's `hf` model encodes it: after the specials a Hugging Face tokenizer's own
  post-processor puts first (Llama 3's bos), which transformers adds by default; nothing else is added."""
  return [*getattr(tokenizer, "leading_ids", ()), *tokenizer.encode(text)]


def rolling(model: Any, texts: Sequence[str], *, batch_size: int = 32, overlap: int = 0,
            mesh: jax.sharding.Mesh | None = None) -> tuple[list[float], list[int]]:
  """(summed log-likelihood, predicted tokens) of each text, under `model` (an `llm_jax.load` handle).

  Texts are encoded as `encode` does and conditioned on `prefix_id`, as lm-eval's `hf` model
  scores them (for a tokenizer that adds a bos itself, that bos is then predicted after the prefix too)."""
  ids = [encode(model.tokenizer, text) for text in texts]
  prefix = prefix_id(model.tokenizer)
  totals = scoring.rolling(model.params, model.config.model, ids, prefix_id=prefix, batch_size=batch_size,
                           overlap=overlap, mesh=mesh)
  return totals, [scoring.predicted_tokens(x, prefix) for x in ids]


def words(text: str) -> int:
  return len(re.split(r"\s+", text))


def figures(log_likelihoods: Sequence[float], tokens: Sequence[int], counted: Sequence[str]) -> dict[str, float]:
  """The perplexities and bits per byte (module docstring) of documents, with the counts they divide by."""
  total = float(sum(log_likelihoods))
  n_tokens, n_words = int(sum(tokens)), sum(words(t) for t in counted)
  n_bytes = sum(len(t.encode("utf-8")) for t in counted)
  return {
      "word_perplexity": math.exp(-total / n_words),
      "byte_perplexity": math.exp(-total / n_bytes),
      "bits_per_byte": -total / n_bytes / math.log(2),
      "token_perplexity": math.exp(-total / n_tokens),
      "log_likelihood": total, "documents": len(counted), "tokens": n_tokens, "words": n_words, "bytes": n_bytes,
  }
