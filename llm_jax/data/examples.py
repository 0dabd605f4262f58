"""Instruction examples as tokens: rendered by a template, tokenized, trained tokens marked, fit to seq_len.

Each text part of a rendered conversation (`templates.render`, adjacent parts of a kind already
merged) is tokenized on its own and the eos part becomes `tokenizer.eos_id`, so a token is trained
exactly when its part is, and the prompt before the first response is tokenized as one text, as
`llm-jax generate` tokenizes `templates.render_prompt`.

An example longer than seq_len is cut, never split across rows:

- when its last response (the trained tokens that end it, eos included) fits, the start is
  dropped: the example keeps its last seq_len tokens, so the whole response survives and the prompt
  loses its beginning (cut "prompt");
- when that response alone is longer, the example keeps the prompt's last min(prompt, seq_len // 2)
  tokens and then the response's first tokens (cut "response"): the answer's start is still
  conditioned on the question, and the end that is lost takes its eos with it, so the model is
  never taught to stop where the text was cut.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from llm_jax.data import templates
from llm_jax.data.documents import DataError
from llm_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Tokens:
  """One example's tokens; `trained` marks response tokens and the eos ending each response."""

  ids: np.ndarray  # int32 [N]
  trained: np.ndarray  # bool [N]
  cut: str = ""  # "" (whole), "prompt" or "response" (module docstring)

  def __len__(self) -> int:
    return len(self.ids)


def fit(tokens: Tokens, seq_len: int) -> Tokens:
  """`tokens` cut to at most seq_len (module docstring)."""
  n = len(tokens)
  if n <= seq_len:
    return tokens
  trained_N = tokens.trained
  if not trained_N.any():  # nothing is trained (an empty response in a template without end text): keep the end
    return Tokens(tokens.ids[n - seq_len:], trained_N[n - seq_len:], "prompt")
  last = n - int(np.argmax(trained_N[::-1]))  # one past the last trained token
  untrained_before = np.flatnonzero(~trained_N[:last])
  start = int(untrained_before[-1]) + 1 if len(untrained_before) else 0  # where the last response begins
  if last - start <= seq_len:
    keep = slice(last - seq_len, last)
    return Tokens(tokens.ids[keep], trained_N[keep], "prompt")
  prompt = min(start, seq_len // 2)
  keep_N = np.r_[start - prompt:start, start:start + seq_len - prompt]
  return Tokens(tokens.ids[keep_N], trained_N[keep_N], "response")


def encode(conversations: Sequence[templates.Conversation], template: templates.Template, tokenizer: Tokenizer,
           seq_len: int) -> list[Tokens]:
  """Each conversation's tokens, fit to seq_len; the texts of all of them go to the tokenizer in one call."""
  rendered = []
  for conversation in conversations:
    try:
      rendered.append(templates.render(template, conversation.messages))
    except templates.TemplateError as e:
      raise DataError(f"{conversation.origin}: {e}") from None
  texts = [text for parts in rendered for text, _ in parts if text is not templates.EOS]
  encoded = iter(tokenizer.encode_batch(texts))
  eos_N = np.array([tokenizer.eos_id], np.int32)
  out = []
  for parts in rendered:
    ids = [eos_N if text is templates.EOS else next(encoded) for text, _ in parts]
    trained = [np.full(len(piece), flag) for piece, (_, flag) in zip(ids, parts)]
    whole = Tokens(np.concatenate(ids or [np.zeros(0, np.int32)]).astype(np.int32),
                   np.concatenate(trained or [np.zeros(0, bool)]).astype(bool))
    out.append(fit(whole, seq_len))
  return out
