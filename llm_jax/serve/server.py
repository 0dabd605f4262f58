"""`llm-jax serve`: the engine behind an HTTP server (FastAPI on uvicorn) that speaks the OpenAI API.

Routes: POST /v1/completions and /v1/chat/completions (JSON, or server-sent events with
"stream": true, ending in `data: [DONE]`), GET /v1/models and GET /health (the engine's slots,
queue and compilation counts). A bad request gets a 400 with one message in the API's error
shape, before any generation. The HTTP side runs on uvicorn's event loop and the engine on its
own thread; each request's events cross over through its asyncio queue. A client that goes away
(a closed stream, or a dropped connection while a non-streaming answer is pending) cancels its
request, and the engine frees the slot before its next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pathlib
import sys
from typing import Any, AsyncIterator, Callable

import fastapi
from fastapi import exceptions, responses

from llm_jax.data import templates
from llm_jax.errors import UserError
from llm_jax.serve import openai_api
from llm_jax.serve.engine import Engine, Event, Request

_POLL_S = 0.25  # how often a pending non-streaming request checks that its client is still there


def _error(status: int, message: str) -> responses.JSONResponse:
  return responses.JSONResponse(openai_api.error_object(message), status_code=status)


def _one_message(error: exceptions.RequestValidationError) -> str:
  """pydantic's first complaint as one line: where in the body, and what is wrong."""
  first = error.errors()[0]
  where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
  if first.get("type") == "json_invalid":
    return "the request body is not valid JSON"
  return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))


def chat_template(model: Any) -> templates.Template:
  """The run's own instruction template; for a plain language model its tokenizer's chat template, else ChatML."""
  data = model.config.data
  if data.format == "text":
    data = dataclasses.replace(data, format="chat",
                               template="tokenizer" if getattr(model.tokenizer, "chat_template", None) else "chatml")
  return templates.from_config(data, model.tokenizer)


def create_app(engine: Engine, model_name: str, template: templates.Template) -> fastapi.FastAPI:
  app = fastapi.FastAPI(title="llm-jax", docs_url=None, redoc_url=None)
  tokenizer = engine.tokenizer

  @app.exception_handler(exceptions.RequestValidationError)
  async def invalid(_, error: exceptions.RequestValidationError):
    return _error(400, _one_message(error))

  @app.exception_handler(UserError)
  async def refused(_, error: UserError):
    return _error(400, str(error))

  @app.get("/health")
  async def health():
    status = engine.status()
    return responses.JSONResponse({"status": "error" if status["error"] else "ok", "model": model_name, **status},
                                  status_code=500 if status["error"] else 200)

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "llm-jax"}]}

  @app.post("/v1/completions")
  async def completions(body: openai_api.CompletionRequest, http: fastapi.Request):
    body.unsupported()
    prompt = openai_api.completion_prompt(body, tokenizer)
    return await _serve(http, body, prompt, 16, openai_api.new_id("cmpl"), openai_api.completion_object,
                        openai_api.completion_chunk, first_chunk=None)

  @app.post("/v1/chat/completions")
  async def chat(body: openai_api.ChatRequest, http: fastapi.Request):
    body.unsupported()
    prompt = openai_api.chat_prompt(body, template, tokenizer)
    return await _serve(http, body, prompt, None, openai_api.new_id("chatcmpl"), openai_api.chat_object,
                        openai_api.chat_chunk, first_chunk=openai_api.chat_chunk)

  async def _serve(http: fastapi.Request, body: Any, prompt: list[int], default_max: int | None, rid: str,
                   whole: Callable, chunk: Callable, first_chunk: Callable | None):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    request = Request(prompt, openai_api.max_tokens(body, len(prompt), engine.cfg.max_len, default_max),
                      on_event=lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
                      temperature=body.temperature, top_p=body.top_p, seed=body.sampling_seed(),
                      stop=body.stop_strings())
    engine.submit(request)  # a RequestError here is a 400, before anything is sent
    if body.stream:
      return responses.StreamingResponse(_sse(request, events, rid, body.model or model_name, chunk, first_chunk),
                                         media_type="text/event-stream")
    text, token_ids = [], []
    try:
      while True:
        try:
          event = await asyncio.wait_for(events.get(), _POLL_S)
        except asyncio.TimeoutError:
          if await http.is_disconnected():
            return responses.Response(status_code=499)  # nobody to read it; the finally frees the slot
          continue
        text.append(event.text)
        token_ids += event.token_ids
        if event.finish_reason == "error":
          return _error(500, f"generation failed: {engine.error}")
        if event.finish_reason:
          return whole(rid, body.model or model_name, "".join(text), token_ids, event.finish_reason, len(prompt))
    finally:
      if not request.finished:
        engine.cancel(request)

  async def _sse(request: Request, events: asyncio.Queue, rid: str, name: str, chunk: Callable,
                 first_chunk: Callable | None) -> AsyncIterator[str]:
    try:
      if first_chunk is not None:
        yield f"data: {json.dumps(first_chunk(rid, name, None))}\n\n"
      while True:
        event = await events.get()
        yield f"data: {json.dumps(chunk(rid, name, event))}\n\n"
        if event.finish_reason:
          break
      yield "data: [DONE]\n\n"
    finally:  # also when the client went away and Starlette cancelled this stream
      if not request.finished:
        engine.cancel(request)

  return app


def warm_up(engine: Engine) -> None:
  """Compiles the decode step and the shortest prompt bucket before the first client waits for them."""
  request = Request([engine.tokenizer.bos_id], max_tokens=2, on_event=lambda e: None)
  engine.submit(request)
  while not request.finished:
    engine.step()
  engine.finished_count = 0


def serve(workdir: str, host: str = "127.0.0.1", port: int = 8000, slots: int = 8) -> None:
  """Loads `workdir` (a run, a checkpoint or an export, int8 included) and serves it until interrupted."""
  import uvicorn

  import llm_jax
  model = llm_jax.load(workdir)
  if model.tokenizer is None:
    raise UserError(f"{workdir} has no tokenizer beside its checkpoint; the server needs one to read prompts")
  engine = Engine(model.params, model.config.model, model.tokenizer, slots=slots)
  template = chat_template(model)
  warm_up(engine)
  name = pathlib.Path(workdir).absolute().name
  app = create_app(engine, name, template)
  engine.start()
  print(f"llm-jax: serving {name} on http://{host}:{port} ({slots} slots, {engine.cache_len} positions each)",
        file=sys.stderr, flush=True)
  try:
    uvicorn.run(app, host=host, port=port, log_level="warning")
  finally:
    engine.stop()
