"""The OpenAI wire format: request bodies in, engine requests out, and the JSON objects and SSE chunks sent back.

Defaults are the OpenAI API's (temperature 1, top_p 1, max_tokens 16 for completions and the rest
of the context for chat), so a client written for it behaves the same here; temperature 0 is
greedy. Fields the API has but this server does not implement are refused with a 400 when set to
anything but their default (n > 1, logprobs, echo, best_of, penalties, logit_bias, tools), and
unknown fields are ignored, as clients send extras. Each choice also carries `token_ids`, the
generated token ids (an extension: the text alone cannot show token-for-token equality).
"""

from __future__ import annotations

import random
import time
import uuid
from typing import Any, Literal, Sequence

import pydantic

from llm_jax.data import templates
from llm_jax.serve.engine import Event, RequestError

_UNSUPPORTED = {"n": 1, "best_of": 1, "logprobs": None, "top_logprobs": None, "echo": False, "suffix": None,
                "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "tools": None,
                "response_format": None}


class _Common(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="allow")

  model: str = ""
  max_tokens: int | None = None
  temperature: float = 1.0
  top_p: float = 1.0
  stop: str | list[str] | None = None
  seed: int | None = None
  stream: bool = False

  def unsupported(self) -> None:
    """Raises for an OpenAI field this server does not implement, set to a value that would need it."""
    extra = self.model_extra or {}
    for name, default in _UNSUPPORTED.items():
      value = extra.get(name, default)
      if value not in (default, None) and not (name == "logprobs" and value is False):
        raise RequestError(f"{name}={value!r} is not supported by this server; leave it out")
    if isinstance(self.stop, list) and len(self.stop) > 4:
      raise RequestError(f"stop has {len(self.stop)} strings; give at most 4")

  def stop_strings(self) -> list[str]:
    return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

  def sampling_seed(self) -> int:
    """The request's seed, or a fresh one: without a seed, sampling differs from call to call, as in the API."""
    return self.seed if self.seed is not None else random.SystemRandom().randrange(2**31)


class CompletionRequest(_Common):
  prompt: str | list[int] | list[str]


class ChatMessage(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="allow")

  role: Literal["system", "user", "assistant", "developer"]
  content: str | list[dict[str, Any]]

  def text(self) -> str:
    if isinstance(self.content, str):
      return self.content
    parts = []
    for part in self.content:
      if part.get("type") != "text" or not isinstance(part.get("text"), str):
        raise RequestError(f"a message content part of type {part.get('type')!r}: only text parts are supported")
      parts.append(part["text"])
    return "".join(parts)


class ChatRequest(_Common):
  messages: list[ChatMessage]
  max_completion_tokens: int | None = None


def completion_prompt(body: CompletionRequest, tokenizer: Any) -> list[int]:
  if isinstance(body.prompt, list) and body.prompt and all(isinstance(p, str) for p in body.prompt):
    if len(body.prompt) != 1:
      raise RequestError(f"prompt is a list of {len(body.prompt)} strings; send one prompt per request")
    body.prompt = body.prompt[0]
  if isinstance(body.prompt, list):
    return list(body.prompt)
  return list(tokenizer.encode(body.prompt)) or [tokenizer.bos_id]


def chat_prompt(body: ChatRequest, template: templates.Template, tokenizer: Any) -> list[int]:
  if not body.messages:
    raise RequestError("messages is empty; send at least one user message")
  messages = [templates.Message("system" if m.role == "developer" else m.role, m.text()) for m in body.messages]
  return list(tokenizer.encode(templates.render_chat_prompt(template, messages)))


def max_tokens(body: _Common, prompt_len: int, context: int, default: int | None) -> int:
  """The request's budget: max_tokens (or max_completion_tokens), else `default`, else the rest of the context."""
  chosen = getattr(body, "max_completion_tokens", None) or body.max_tokens
  return chosen if chosen is not None else (default if default is not None else max(1, context - prompt_len))


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _usage(prompt_len: int, completion_len: int) -> dict[str, int]:
  return {"prompt_tokens": prompt_len, "completion_tokens": completion_len,
          "total_tokens": prompt_len + completion_len}


def completion_object(rid: str, model: str, text: str, token_ids: Sequence[int], reason: str,
                      prompt_len: int) -> dict[str, Any]:
  return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
          "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason,
                       "token_ids": list(token_ids)}],
          "usage": _usage(prompt_len, len(token_ids))}


def chat_object(rid: str, model: str, text: str, token_ids: Sequence[int], reason: str,
                prompt_len: int) -> dict[str, Any]:
  return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
          "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                       "finish_reason": reason, "token_ids": list(token_ids)}],
          "usage": _usage(prompt_len, len(token_ids))}


def completion_chunk(rid: str, model: str, event: Event) -> dict[str, Any]:
  return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
          "choices": [{"index": 0, "text": event.text, "logprobs": None, "finish_reason": event.finish_reason,
                       "token_ids": event.token_ids}]}


def chat_chunk(rid: str, model: str, event: Event | None) -> dict[str, Any]:
  """A chat delta; `None` is the first chunk, which names the role."""
  delta = {"role": "assistant", "content": ""} if event is None else {"content": event.text} if event.text else {}
  return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
          "choices": [{"index": 0, "delta": delta, "logprobs": None,
                       "finish_reason": None if event is None else event.finish_reason,
                       "token_ids": [] if event is None else event.token_ids}]}


def error_object(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
  return {"error": {"message": message, "type": kind, "param": None, "code": None}}
