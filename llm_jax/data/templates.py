"""Prompt templates: a conversation rendered into text parts, each marked trained or not.

`render(template, messages)` turns a conversation (`Message`s with roles system, user and
assistant) into parts `(text, trained)`: prompt, system and user text has trained=False; every
assistant response and the eos that ends it have trained=True, so the loss learns to answer and
to stop, never to write prompts. The eos is the part `(EOS, True)`, EOS being None: llm-jax's own
tokenizers have an eos id but no text for it. Adjacent parts of one kind are merged and the
untrained tail after the last response is dropped (it would train nothing).

Templates (`data.template`):

- `alpaca`: Stanford Alpaca's prompt ("Below is an instruction ... ### Instruction: ... ### Input: ...
  ### Response:"), the response, then eos; a first system message replaces the preamble.
- `chatml`: `<|im_start|>ROLE\\nCONTENT<|im_end|>\\n` for system and user turns; an assistant turn
  ends with the eos id in place of `<|im_end|>`, which is exactly ChatML for a tokenizer whose eos is
  `<|im_end|>` (Qwen2) and makes generation stop at eos for any other.
- `tokenizer`: the Hugging Face chat template (a jinja2 string from tokenizer_config.json or
  chat_template.jinja), rendered as transformers' `apply_chat_template(..., tokenize=False)` renders it:
  a sandboxed jinja2 environment with trim_blocks and lstrip_blocks, `raise_exception`, `tojson`,
  `strftime_now`, the `bos_token`/`eos_token` variables and `add_generation_prompt`. Templates mark no
  response, so the masks come from prefixes: the prompt of assistant turn i is the conversation up to
  it rendered with add_generation_prompt=True, and its response is what rendering the turn itself
  adds to that, the template's end-of-turn text (`<|im_end|>\\n`, `<|eot_id|>`) included. A template
  that renders an earlier turn differently once later turns follow cannot be split so and is refused.

An Alpaca record's `input` rides on its user message: the alpaca template gives it its "### Input:"
section; the others append it to the instruction after a newline, as LLaMA-Factory does.

`render_prompt(template, text)` is the text that training put before the response of a one-turn
conversation [user: text], so `llm-jax generate` of an SFT run conditions the model on what it
learned to answer.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import pathlib
from typing import Any, NamedTuple, Protocol, Sequence

from llm_jax.config import DataConfig
from llm_jax.errors import UserError

ROLES = ("system", "user", "assistant")
EOS = None  # the text of a part that stands for the tokenizer's eos id
Part = tuple[str | None, bool]  # (text, or EOS; whether the loss trains on it)

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n")
ALPACA_PREAMBLE_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                              "further context. Write a response that appropriately completes the request.\n\n")


class TemplateError(UserError):
  """A chat template that cannot be found, compiled or used to render a conversation."""


class Message(NamedTuple):
  role: str  # one of ROLES
  content: str
  input: str = ""  # an Alpaca record's input (user messages only)

  def text(self) -> str:
    """The content, with an Alpaca input appended after a newline (for templates without an input section)."""
    return f"{self.content}\n{self.input}" if self.input else self.content


@dataclasses.dataclass(frozen=True)
class Conversation:
  """One training example; `origin` ("FILE record N") names it in error messages."""

  messages: tuple[Message, ...]
  origin: str


class Template(Protocol):
  name: str

  def parts(self, messages: Sequence[Message]) -> list[Part]:
    """The conversation as parts, before `render` merges and trims them."""


@dataclasses.dataclass(frozen=True)
class Alpaca:
  name = "alpaca"

  def parts(self, messages: Sequence[Message]) -> list[Part]:
    rest = list(messages)
    if rest and rest[0].role == "system":
      parts = [(rest.pop(0).content + "\n\n", False)]
    else:
      parts = [(ALPACA_PREAMBLE_WITH_INPUT if any(m.input for m in messages) else ALPACA_PREAMBLE, False)]
    after_response = False
    for m in rest:
      lead = "\n\n" if after_response else ""
      if m.role == "assistant":
        parts += [(f"{lead}### Response:\n", False), (m.content, True), (EOS, True)]
      elif m.role == "user":
        section = f"### Input:\n{m.input}\n\n" if m.input else ""
        parts.append((f"{lead}### Instruction:\n{m.content}\n\n{section}", False))
      else:
        parts.append((f"{lead}{m.content}\n\n", False))
      after_response = m.role == "assistant"
    return parts


@dataclasses.dataclass(frozen=True)
class ChatML:
  name = "chatml"

  def parts(self, messages: Sequence[Message]) -> list[Part]:
    parts, after_response = [], False
    for m in messages:
      lead = "\n" if after_response else ""  # the line break after <|im_end|>, here after the eos standing for it
      if m.role == "assistant":
        parts += [(f"{lead}<|im_start|>assistant\n", False), (m.content, True), (EOS, True)]
      else:
        parts.append((f"{lead}<|im_start|>{m.role}\n{m.text()}<|im_end|>\n", False))
      after_response = m.role == "assistant"
    return parts


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A Hugging Face chat template: its jinja source and the special-token names it may print."""

  source: str
  origin: str  # where it came from, for messages
  bos_token: str | None = None
  eos_token: str | None = None
  name = "tokenizer"

  def render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    chat = [{"role": m.role, "content": m.text()} for m in messages]
    return render_chat_template(self.source, chat, add_generation_prompt=add_generation_prompt,
                                bos_token=self.bos_token, eos_token=self.eos_token, origin=self.origin)

  def parts(self, messages: Sequence[Message]) -> list[Part]:
    parts, done = [], ""
    for i, m in enumerate(messages):
      if m.role != "assistant":
        continue
      prompt = self.render(messages[:i], add_generation_prompt=True)
      full = self.render(messages[:i + 1], add_generation_prompt=False)
      if not (prompt.startswith(done) and full.startswith(prompt)):
        raise TemplateError(f"the chat template of {self.origin} renders an assistant turn differently once more "
                            f"turns follow (seen at message {i + 1}), so responses cannot be told from prompts; use "
                            "data.template=chatml or alpaca")
      parts += [(prompt[len(done):], False), (full[len(prompt):], True)]
      done = full
    return parts


def render(template: Template, messages: Sequence[Message]) -> list[Part]:
  """The conversation as parts (module docstring): adjacent ones of a kind merged, no empty text,
  nothing after the last trained part."""
  merged: list[Part] = []
  for text, trained in template.parts(messages):
    if text == "":
      continue
    if merged and text is not EOS and merged[-1][0] is not EOS and merged[-1][1] == trained:
      merged[-1] = (merged[-1][0] + text, trained)
    else:
      merged.append((text, trained))
  while merged and not merged[-1][1]:
    merged.pop()
  return merged


def render_prompt(template: Template, text: str) -> str:
  """What training saw before the response of the conversation [user: text]: the text to generate from."""
  return render_chat_prompt(template, [Message("user", text)])


def render_chat_prompt(template: Template, messages: Sequence[Message]) -> str:
  """The text before the next assistant response to `messages`: what a chat model answers from.

  Every template ends an assistant turn with its response and the eos part, so the prompt is all
  before those two; the eos ending an earlier response has no text and is left out of it.
  """
  if isinstance(template, ChatTemplate):
    return template.render(messages, add_generation_prompt=True)
  parts = template.parts([*messages, Message("assistant", "")])
  return "".join(part for part, _ in parts[:-2] if part is not EOS)


# ----------------------------------------------------------------------------- Hugging Face chat templates


@functools.lru_cache(maxsize=8)
def _compiled(source: str, origin: str):
  """The template compiled in an environment like transformers' (`_compile_jinja_template`)."""
  try:
    import jinja2
    from jinja2 import ext, sandbox
  except ImportError:
    raise TemplateError("data.template=tokenizer renders the chat template with jinja2, which is not installed: "
                        "pip install 'jinja2>=3.1'") from None

  class Generation(ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[Generation, ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(source)
  except jinja2.TemplateSyntaxError as e:
    raise TemplateError(f"the chat template of {origin} is not valid jinja ({e.message} at line {e.lineno}); fix it "
                        "or set data.template=chatml") from None


def render_chat_template(source: str, messages: list[dict[str, str]], *, add_generation_prompt: bool,
                         bos_token: str | None = None, eos_token: str | None = None,
                         origin: str = "the tokenizer") -> str:
  """The text transformers' `apply_chat_template(messages, tokenize=False, ...)` gives for this template."""
  import jinja2
  template = _compiled(source, origin)
  names = {key: value for key, value in (("bos_token", bos_token), ("eos_token", eos_token)) if value is not None}
  try:
    return template.render(messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                           **names)
  except jinja2.TemplateError as e:  # raise_exception() in the template, or a bad construct met while rendering
    reason = " ".join(str(e).split()) or type(e).__name__
    raise TemplateError(f"the chat template of {origin} refused the conversation: {reason}; fix the record or set "
                        "data.template=chatml") from None


def _token_name(value: Any) -> str | None:
  """A special token as tokenizer_config.json spells it: a string or an AddedToken dict's "content"."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


def _read_json(path: pathlib.Path) -> dict:
  try:
    content = json.loads(path.read_bytes())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise TemplateError(f"data.chat_template: {path} is not a readable JSON file ({e}); pass a transformers "
                        "tokenizer_config.json") from None
  if not isinstance(content, dict):
    raise TemplateError(f"data.chat_template: {path} holds a JSON {type(content).__name__}, not an object; pass a "
                        "transformers tokenizer_config.json")
  return content


def load_chat_template(path: str | pathlib.Path) -> ChatTemplate:
  """The chat template of a transformers tokenizer_config.json, a .jinja file, or a folder holding them.

  As in transformers, chat_template.jinja wins over the config's "chat_template" (of a list of named
  templates, "default"), and special_tokens_map.json's token names over the config's.
  """
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise TemplateError(f"data.chat_template={str(path)!r}: no such file or folder; pass a tokenizer_config.json, a "
                        ".jinja file or a transformers folder")
  folder = path if path.is_dir() else path.parent
  config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
  if path.is_file() and path.suffix == ".json":
    config = _read_json(path)
  special = _read_json(folder / "special_tokens_map.json") if (folder / "special_tokens_map.json").is_file() else {}
  jinja_file = path if path.is_file() and path.suffix != ".json" else folder / "chat_template.jinja"
  source = config.get("chat_template")
  if isinstance(source, list):
    source = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}.get("default")
  if jinja_file.is_file():
    source = jinja_file.read_text(encoding="utf-8")
  if not isinstance(source, str) or not source.strip():
    raise TemplateError(f"data.chat_template={str(path)!r} holds no chat template; pass the tokenizer_config.json of "
                        "a chat model, or set data.template=chatml")
  names = {role: _token_name(special.get(f"{role}_token")) or _token_name(config.get(f"{role}_token"))
           for role in ("bos", "eos")}
  return ChatTemplate(source, str(path), bos_token=names["bos"], eos_token=names["eos"])


def from_config(data: DataConfig, tokenizer: Any) -> Template | None:
  """The template of `data` (None for data.format=text); data.template=tokenizer reads
  data.chat_template, or else the tokenizer's own `chat_template` and its `bos_token`/`eos_token` names."""
  if data.format == "text":
    return None
  if data.template == "alpaca":
    return Alpaca()
  if data.template == "chatml":
    return ChatML()
  if data.template != "tokenizer":
    raise TemplateError(f"data.template={data.template!r}: expected alpaca, chatml or tokenizer")
  if data.chat_template:
    return load_chat_template(data.chat_template)
  source = getattr(tokenizer, "chat_template", None)
  if not source:
    raise TemplateError(f"data.template=tokenizer, but {tokenizer!r} has no chat template; set "
                        "data.chat_template=PATH/tokenizer_config.json, or data.template=chatml or alpaca")
  names = {role: getattr(tokenizer, f"{role}_token", None) for role in ("bos", "eos")}
  unknown = [f"{role}_token" for role, name in names.items() if name is None and f"{role}_token" in source]
  if unknown:
    raise TemplateError(f"the chat template of {tokenizer!r} prints {unknown[0]}, whose text this tokenizer does not "
                        "name; set data.chat_template to its tokenizer_config.json")
  return ChatTemplate(source, repr(tokenizer), bos_token=names["bos"], eos_token=names["eos"])
