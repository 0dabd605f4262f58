"""Multiple-choice questions scored as lm-eval scores them, through the engine.

Each choice is a request (context, delimiter + choice); the answer is the choice of highest
log-likelihood (`acc`) or of highest log-likelihood per character of the choice (`acc_norm`,
lm-eval's length normalisation). Text becomes tokens as lm-eval's causal models do it
(`encode_pair`), so a task here and the same task through lm-eval-harness (harness.py) send
the engine the very same requests.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from llm_jax.eval import perplexity, scoring


class Question(NamedTuple):
  context: str
  choices: Sequence[str]
  gold: int


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) as lm-eval's causal models cut them: spaces ending the context move to the
  continuation, the whole text is encoded once and split after the context's own tokens. An empty context is
  the prefix token (`perplexity.prefix_id`, eos for llm-jax's tokenizers) unless the continuation starts with it."""
  if not context:
    prefix = perplexity.prefix_id(tokenizer)
    ids = tokenizer.encode(continuation)  # lm-eval encodes it without specials
    prefix = tokenizer.eos_id if prefix is None else prefix
    return (ids[:1], ids[1:]) if ids and ids[0] == prefix else ([prefix], ids)
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  whole, context_ids = perplexity.encode(tokenizer, context + continuation), perplexity.encode(tokenizer, context)
  return context_ids, whole[len(context_ids):]


def answer(model: Any, questions: Sequence[Question], *, batch_size: int = 32, delimiter: str = " ",
           mesh: jax.sharding.Mesh | None = None) -> dict[str, float]:
  """`acc` and `acc_norm` of `model` (an `llm_jax.load` handle) over `questions`, and how many requests were cut
  to the model's context from the left (`truncated`)."""
  requests, owners = [], []
  max_len = model.config.model.max_len
  for q, question in enumerate(questions):
    for choice in question.choices:
      requests.append(encode_pair(model.tokenizer, question.context, delimiter + choice))
      owners.append(q)
      if len(requests[-1][1]) > max_len:
        raise scoring.ScoringError(
            f"question {q + 1}: a choice of {len(requests[-1][1])} tokens does not fit the model's context of "
            f"model.max_len={max_len} tokens, so it cannot be scored (lm-eval refuses it too); evaluate a model with "
            "a longer context, or fewer questions with --limit")
  results = scoring.score(model.params, model.config.model, requests, batch_size=batch_size, mesh=mesh)
  log_likelihoods: list[list[float]] = [[] for _ in questions]
  for q, (log_p, _) in zip(owners, results):
    log_likelihoods[q].append(log_p)
  hits = hits_norm = 0
  for question, lls in zip(questions, log_likelihoods):
    lengths = np.array([float(len(c)) for c in question.choices])
    hits += int(np.argmax(lls)) == question.gold
    hits_norm += int(np.argmax(np.array(lls) / lengths)) == question.gold
  return {"acc": hits / len(questions), "acc_norm": hits_norm / len(questions), "questions": len(questions),
          "requests": len(requests),
          "truncated": sum(scoring.needs_truncation(r, model.config.model.max_len) for r in requests)}
