"""`llm-jax serve` over real HTTP on 127.0.0.1: one server subprocess for the module, the `openai` client as a client.

The model is a tiny GPT-2 with peaked random weights (init_std 0.2), so greedy choices have clear
margins, and a context of 1024 positions, so a long request runs long enough to be cut off.
"""

import concurrent.futures
import dataclasses
import http.client
import json
import os
import socket
import subprocess
import sys
import time

import jax
import pytest

import llm_jax
from llm_jax import checkpoint, sampling
from llm_jax import config as config_lib
from llm_jax.data import templates
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.model import presets, transformer

openai = pytest.importorskip("openai", reason="the serve extra (fastapi, uvicorn, openai) is not installed")
pytestmark = pytest.mark.slow  # a server subprocess

MODEL = dataclasses.replace(presets.get("tiny-gpt2"), vocab_size=tokenizer_lib.BYTE_VOCAB_SIZE, init_std=0.2,
                            max_len=1024)
SLOTS = 8


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  path = tmp_path_factory.mktemp("serve") / "tiny"
  checkpoint.save_params(path, transformer.init_params(MODEL, jax.random.key(7)), config_lib.Config(model=MODEL))
  tokenizer_lib.ByteTokenizer().save(path)
  return path


@pytest.fixture(scope="module")
def model(export):
  return llm_jax.load(export)


@pytest.fixture(scope="module")
def server(export):
  """The real command on a free port of 127.0.0.1; yields its port once /health answers."""
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user runs it
  proc = subprocess.Popen([sys.executable, "-m", "llm_jax", "serve", "--workdir", str(export), "--host", "127.0.0.1",
                           "--port", str(port), "--slots", str(SLOTS)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while True:
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    assert time.time() < deadline, "the server did not answer /health in 300 s"
    try:
      if get(port, "/health")[0] == 200:
        break
    except OSError:
      time.sleep(0.5)
  yield port
  proc.terminate()
  proc.wait(timeout=60)


def request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
  conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
  response = conn.getresponse()
  status, data = response.status, response.read()
  conn.close()
  return status, json.loads(data)


def get(port: int, path: str) -> tuple[int, dict]:
  return request(port, "GET", path)


def post(port: int, path: str, body: dict) -> tuple[int, dict]:
  return request(port, "POST", path, json.dumps(body).encode())


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="unused", max_retries=0)


def solo(model, prompt_ids, max_tokens, **kwargs):
  """What `llm_jax.sampling.generate` gives one prompt alone."""
  return sampling.generate(model.params, model.config.model, [prompt_ids], max_new_tokens=max_tokens,
                           eos_id=model.tokenizer.eos_id, **kwargs)[0]


def text_of(model, completion) -> str:
  tokens = completion.tokens[:-1] if completion.finish_reason == "eos" else completion.tokens
  return model.tokenizer.decode(tokens)


def test_greedy_completions_and_chat_equal_generate_token_for_token(client, model):
  """Completions and chat, whole and streamed, through the openai client: the tokens and text of generate."""
  tok = model.tokenizer
  for prompt, max_tokens in (("ROMEO:", 12), ("a", 30), ("The quick brown fox jumps", 9)):
    expected = solo(model, tok.encode(prompt), max_tokens)
    reason = "length" if expected.finish_reason == "length" else "stop"
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0)
    assert whole.choices[0].token_ids == expected.tokens
    assert whole.choices[0].text == text_of(model, expected) and whole.choices[0].finish_reason == reason
    assert whole.usage.prompt_tokens == len(tok.encode(prompt)) and whole.usage.completion_tokens == len(expected.tokens)
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                            stream=True))
    assert len(chunks) > 1 and "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert sum((c.choices[0].token_ids for c in chunks), []) == expected.tokens
    assert chunks[-1].choices[0].finish_reason == reason

  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
  rendered = templates.render_chat_prompt(templates.ChatML(), [templates.Message(m["role"], m["content"])
                                                               for m in messages])
  expected = solo(model, tok.encode(rendered), 15)
  chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0)
  assert chat.choices[0].message.role == "assistant" and chat.choices[0].token_ids == expected.tokens
  assert chat.choices[0].message.content == text_of(model, expected)
  streamed = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0,
                                                 stream=True))
  assert streamed[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content


def test_32_concurrent_requests_each_equal_their_solo_result(server, client, model):
  """Different prompt lengths and budgets, more requests than slots: every answer is the one it gets alone, and
  generate's; the decode step compiled once, the prefill at most once per prompt bucket."""
  tok = model.tokenizer
  prompts = [("abcdefghijklmnopqrstuvwxyz"[:1 + i % 23] + str(i), 4 + (7 * i) % 29) for i in range(32)]

  def ask(item):
    prompt, max_tokens = item
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0]

  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    together = list(pool.map(ask, prompts))
  compiled = get(server, "/health")[1]["compiled"]
  alone = [ask(item) for item in prompts]
  budget = max(m for _, m in prompts)
  batch = sampling.generate(model.params, model.config.model, [tok.encode(p) for p, _ in prompts],
                            max_new_tokens=budget, eos_id=tok.eos_id)
  for (prompt, max_tokens), a, b, c in zip(prompts, together, alone, batch):
    assert a.token_ids == b.token_ids == c.tokens[:max_tokens], prompt
    assert a.text == b.text
  status = get(server, "/health")[1]
  assert status["active"] == 0 and status["waiting"] == 0 and status["slots"] == SLOTS
  assert status["compiled"] == compiled  # the same requests again compiled nothing
  assert compiled["decode_step"] == 1 and compiled["prefill"] <= len([8, 16, 32, 64, 128, 256, 512, 1024])


def test_seed_stop_and_sampling_settings(client, model):
  """A seeded sample is generate's with that seed, and repeats; another seed differs; a stop string ends the text
  before it."""
  tok = model.tokenizer
  ids = tok.encode("seeded")
  kw = dict(model="tiny", prompt="seeded", max_tokens=20, temperature=0.9, top_p=0.8)
  first = client.completions.create(seed=3, **kw).choices[0]
  assert first.token_ids == solo(model, ids, 20, temperature=0.9, top_p=0.8, seed=3).tokens
  assert client.completions.create(seed=3, **kw).choices[0].token_ids == first.token_ids
  others = [client.completions.create(seed=s, **kw).choices[0].token_ids for s in (4, 5)]
  assert any(o != first.token_ids for o in others)

  greedy = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, temperature=0).choices[0].text
  stop = greedy[5:7]
  cut = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, temperature=0, stop=[stop, "\x00"])
  assert cut.choices[0].text == greedy[:greedy.find(stop)] and cut.choices[0].finish_reason == "stop"
  streamed = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, temperature=0, stop=stop,
                                       stream=True)
  assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_a_client_that_disconnects_frees_its_slot(server, model):
  """A stream of 1000 tokens (no eos on the way: checked with generate) is closed after its first chunk: the
  engine counts it cancelled and frees the slot long before it could have finished."""
  prompt = "Once"
  assert solo(model, model.tokenizer.encode(prompt), 1000).finish_reason == "length"
  before = get(server, "/health")[1]
  conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
  conn.request("POST", "/v1/completions", body=json.dumps({"prompt": prompt, "max_tokens": 1000, "temperature": 0,
                                                           "stream": True}),
               headers={"Content-Type": "application/json"})
  response = conn.getresponse()
  assert response.status == 200 and response.readline().startswith(b"data: ")
  conn.close()
  deadline = time.time() + 30
  while (status := get(server, "/health")[1])["active"] and time.time() < deadline:
    time.sleep(0.05)
  assert status["active"] == 0 and status["cancelled"] == before["cancelled"] + 1
  assert status["finished"] == before["finished"]


@pytest.mark.parametrize("body, message", [
    (b"{not json", "the request body is not valid JSON"),
    ({"max_tokens": 5}, "prompt: Field required"),
    ({"prompt": "hi", "max_tokens": "many"}, "max_tokens: Input should be a valid integer, unable to parse string as "
                                             "an integer"),
    ({"prompt": "hi", "max_tokens": 2000}, "the prompt's 2 tokens + max_tokens=2000 exceed this model's context of "
                                           "1024 tokens; shorten the prompt or lower max_tokens"),
    ({"prompt": "hi", "temperature": -1}, "temperature=-1.0: expected >= 0 (0 is greedy)"),
    ({"prompt": "hi", "top_p": 0}, "top_p=0.0: expected 0 < top_p <= 1"),
    ({"prompt": "hi", "n": 2}, "n=2 is not supported by this server; leave it out"),
    ({"prompt": ["a", "b"]}, "prompt is a list of 2 strings; send one prompt per request"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop has 5 strings; give at most 4"),
])
def test_bad_requests_get_a_400_with_one_message(server, body, message):
  status, reply = request(server, "POST", "/v1/completions", body if isinstance(body, bytes) else json.dumps(body).encode())
  assert status == 400 and reply == {"error": {"message": message, "type": "invalid_request_error", "param": None,
                                               "code": None}}
  status, reply = post(server, "/v1/chat/completions", {"messages": [], "max_tokens": 3})
  assert status == 400 and reply["error"]["message"] == "messages is empty; send at least one user message"
  assert get(server, "/health")[1]["active"] == 0
