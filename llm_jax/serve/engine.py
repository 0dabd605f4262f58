"""Continuous batching: a fixed number of slots, requests joining and leaving between decode steps.

One thread runs the loop: admit waiting requests into free slots (one prefill each, which also
draws the first token), then one decode step for every active slot, then hand each slot's new
token to its request. A request that finishes (eos, a stop string, max_tokens) or is cancelled
(its client went away) frees its slot before the next step, for the next waiting request.
Requests never wait for each other to finish, only for a free slot.

The text side lives here too, on the host: each request decodes its tokens as they come, ends at
the first stop string (the text is cut before it, as the OpenAI API does), and passes on only
text that can no longer change: not a trailing partial UTF-8 character, not a tail that may yet
grow into a stop string.

Requests come in from other threads (`submit`, `cancel`); a request's events go out through
its `on_event` callback, called from the engine's thread.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import traceback
from typing import Any, Callable, Sequence

import jax
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.errors import UserError
from llm_jax.sampling import decode
from llm_jax.serve import steps


class RequestError(UserError):
  """A request the engine cannot serve as asked (too long, bad settings): the HTTP layer's 400."""


@dataclasses.dataclass(frozen=True)
class Event:
  """New text of a request (possibly empty), with the tokens that came since the last event; the last event has
  `finish_reason` ("stop": eos or a stop string, "length": max_tokens, "cancelled", "error": the engine failed)."""

  text: str
  token_ids: list[int]
  finish_reason: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
  prompt_ids: list[int]
  max_tokens: int
  on_event: Callable[[Event], None]
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  stop: Sequence[str] = ()
  # filled in by the engine
  token_ids: list[int] = dataclasses.field(default_factory=list)
  text: str = ""  # the text passed on so far
  sent_tokens: int = 0
  cancelled: bool = False
  finished: bool = False


def _held_back(text: str, stop: Sequence[str]) -> int:
  """How many trailing characters of `text` may still change: a partial character, or a start of a stop string."""
  partial = len(text) - len(text.rstrip("\ufffd"))
  longest = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
  return max(partial, longest)


class Engine:
  """Serves requests from `slots` rows of one KV cache of `cache_len` positions per row."""

  def __init__(self, params: Any, cfg: ModelConfig, tokenizer: Any, slots: int = 8, cache_len: int | None = None):
    if slots < 1:
      raise UserError(f"--slots {slots}: expected at least 1")
    self.params, self.cfg, self.tokenizer, self.slots = params, cfg, tokenizer, slots
    self.cache_len = cache_len or decode.bucket(cfg.max_len)
    self.cache = steps.new_cache(params, cfg, slots, self.cache_len)
    self.rows: list[Request | None] = [None] * slots
    self.waiting: queue.Queue[Request] = queue.Queue()
    self.cancelled_count = 0
    self.error: str | None = None  # why the engine's thread stopped, if it failed
    self.finished_count = 0
    self._stopped = threading.Event()
    self._thread: threading.Thread | None = None

  # ------------------------------------------------------------------ other threads

  def check(self, request: Request) -> None:
    """Raises RequestError for a request that could not run; call before `submit`."""
    n = len(request.prompt_ids)
    if n == 0:
      raise RequestError("the prompt is empty; give it at least one token")
    if request.max_tokens < 1:
      raise RequestError(f"max_tokens={request.max_tokens}: expected at least 1")
    limit = min(self.cfg.max_len, self.cache_len)
    if n + request.max_tokens > limit:
      raise RequestError(f"the prompt's {n} tokens + max_tokens={request.max_tokens} exceed this model's context of "
                         f"{limit} tokens; shorten the prompt or lower max_tokens")
    if request.temperature < 0:
      raise RequestError(f"temperature={request.temperature}: expected >= 0 (0 is greedy)")
    if not 0 < request.top_p <= 1:
      raise RequestError(f"top_p={request.top_p}: expected 0 < top_p <= 1")
    if not 0 <= request.seed < 2**31:
      raise RequestError(f"seed={request.seed}: expected 0 <= seed < 2**31")

  def submit(self, request: Request) -> None:
    if self.error is not None:
      raise RuntimeError(f"the engine stopped after an error ({self.error}); restart the server")
    self.check(request)
    self.waiting.put(request)

  def cancel(self, request: Request) -> None:
    """Frees the request's slot before the next decode step (or drops it from the queue)."""
    request.cancelled = True

  def start(self) -> None:
    self._thread = threading.Thread(target=self._run, name="llm-jax-engine", daemon=True)
    self._thread.start()

  def stop(self) -> None:
    self._stopped.set()
    if self._thread is not None:
      self._thread.join()

  def status(self) -> dict[str, Any]:
    return {"error": self.error, "slots": self.slots, "active": sum(r is not None for r in self.rows), "waiting": self.waiting.qsize(),
            "finished": self.finished_count, "cancelled": self.cancelled_count, "cache_len": self.cache_len,
            "compiled": {"prefill": steps.prefill._cache_size(), "decode_step": steps.decode_step._cache_size()}}

  # ------------------------------------------------------------------ the engine's thread

  def _run(self) -> None:
    try:
      while not self._stopped.is_set():
        self.step(block=True)
    except Exception as e:  # a bug or an out-of-memory: say so, and end every request instead of leaving it hanging
      self.error = f"{type(e).__name__}: {e}"
      traceback.print_exc()
      for row, request in enumerate(self.rows):
        if request is not None:
          self._finish(row, "error")
      while not self.waiting.empty():
        self.waiting.get().on_event(Event("", [], "error"))

  def step(self, block: bool = False) -> None:
    """One iteration: drop cancelled requests, admit waiting ones into free slots, one decode step for all."""
    for row, request in enumerate(self.rows):
      if request is not None and request.cancelled:
        self._finish(row, "cancelled")
    self._admit(block)
    active = [row for row, r in enumerate(self.rows) if r is not None]
    if not active:
      return
    tokens_B = np.zeros(self.slots, np.int32)
    active_B = np.zeros(self.slots, bool)
    temperature_B = np.zeros(self.slots, np.float32)
    top_p_B = np.ones(self.slots, np.float32)
    seed_B = np.zeros(self.slots, np.int32)
    step_B = np.zeros(self.slots, np.int32)
    for row in active:
      r = self.rows[row]
      tokens_B[row], active_B[row], step_B[row] = r.token_ids[-1], True, len(r.token_ids)
      temperature_B[row], top_p_B[row], seed_B[row] = r.temperature, r.top_p, r.seed
    new_B, _, self.cache = steps.decode_step(self.params, self.cache, tokens_B, active_B, temperature_B, top_p_B,
                                             seed_B, step_B, cfg=self.cfg)
    new_B = jax.device_get(new_B)
    for row in active:
      self._take(row, int(new_B[row]))

  def _admit(self, block: bool) -> None:
    idle = all(r is None for r in self.rows)
    while None in self.rows:
      try:
        request = self.waiting.get(block=block and idle, timeout=0.05 if block and idle else None)
      except queue.Empty:
        return
      idle = False
      if request.cancelled:
        self.cancelled_count += 1
        request.on_event(Event("", [], "cancelled"))
        continue
      row = self.rows.index(None)
      self.rows[row] = request
      n = len(request.prompt_ids)
      prompt_1P = np.zeros((1, decode.bucket(n)), np.int32)
      prompt_1P[0, :n] = request.prompt_ids
      token, _, self.cache = steps.prefill(self.params, self.cache, np.int32(row), prompt_1P, np.int32(n),
                                           np.float32(request.temperature), np.float32(request.top_p),
                                           np.int32(request.seed), cfg=self.cfg)
      self._take(row, int(token))

  def _take(self, row: int, token: int) -> None:
    """Hands a new token to the request in `row`; finishes it on eos, a stop string or max_tokens."""
    request = self.rows[row]
    request.token_ids.append(token)
    eos = token == self.tokenizer.eos_id
    text = self.tokenizer.decode(request.token_ids[:-1] if eos else request.token_ids)
    cut = min((i for i in (text.find(s) for s in request.stop if s) if i >= 0), default=None)
    if cut is not None or eos:
      self._finish(row, "stop", text if cut is None else text[:cut])
    elif len(request.token_ids) >= request.max_tokens:
      self._finish(row, "length", text)
    else:
      self._emit(request, text[:len(text) - _held_back(text, request.stop)])

  def _emit(self, request: Request, text: str, finish_reason: str | None = None) -> None:
    """Passes on what `text` adds to what was passed on (text only grows: held-back text is never sent early)."""
    new_text = text[len(request.text):]
    new_tokens = request.token_ids[request.sent_tokens:]
    if new_text or new_tokens or finish_reason:
      request.text, request.sent_tokens = text, len(request.token_ids)
      request.on_event(Event(new_text, new_tokens, finish_reason))

  def _finish(self, row: int, reason: str, text: str | None = None) -> None:
    request = self.rows[row]
    self.rows[row] = None
    request.finished = True
    if reason == "cancelled":
      self.cancelled_count += 1
    else:
      self.finished_count += 1
    self._emit(request, request.text if text is None else text, reason)
