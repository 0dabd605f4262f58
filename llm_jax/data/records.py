"""Records read whole into memory: instruction records (json:, jsonl: with data.format alpaca or chat) as
`templates.Conversation`s, and classification rows (tsv:) as `Sentence`s. A bad record fails with its
file and record or line number and the fix.
"""

from __future__ import annotations

import json
import pathlib
from typing import NamedTuple

from llm_jax.data import templates
from llm_jax.data.documents import DataError, files, read_text
from llm_jax.data.templates import Conversation, Message


class Sentence(NamedTuple):
  """One classification example: its text, its class and where it came from (for messages)."""

  text: str
  label: int
  origin: str


def _records(scheme: str, path: pathlib.Path) -> list[tuple[str, object]]:
  """(where, record) of a json: file (one array; "FILE record N") or a jsonl: file ("FILE line N")."""
  text = read_text(path)
  if scheme == "jsonl":
    records = []
    for number, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          records.append((f"{path} line {number}", json.loads(line)))
        except json.JSONDecodeError as e:
          raise DataError(f"{path} line {number}: not JSON ({e.msg}); each line must be one JSON object") from None
  elif not text.strip():
    records = []
  else:
    try:
      array = json.loads(text)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno}); a json: source is one JSON "
                      "array of records") from None
    if not isinstance(array, list):
      raise DataError(f"{path} holds a JSON {type(array).__name__}, not an array of records; write [{{...}}, ...] or "
                      "use jsonl: for a record per line")
    records = [(f"{path} record {number}", record) for number, record in enumerate(array, 1)]
  if not records:
    raise DataError(f"{path} holds no records; add some or leave the file out of data.source")
  return records


def _alpaca_example(record: object, where: str) -> Conversation:
  if not isinstance(record, dict):
    raise DataError(f"{where} is a JSON {type(record).__name__}, not an object with instruction, input and output")
  for key in ("instruction", "output"):
    if not isinstance(record.get(key), str):
      raise DataError(f"{where} has no {key!r} string (it has {sorted(record)}); every Alpaca record needs "
                      "instruction and output (input may be empty)")
  extra = record.get("input")
  if extra is not None and not isinstance(extra, str):
    raise DataError(f"{where}: 'input' is a {type(extra).__name__}, not a string; make it text or \"\"")
  return Conversation((Message("user", record["instruction"], extra or ""), Message("assistant", record["output"])),
                      where)


def _chat_example(record: object, where: str) -> Conversation:
  messages = record.get("messages") if isinstance(record, dict) else None
  if not isinstance(messages, list) or not messages:
    found = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(f"{where} has no 'messages' list (found {found}); a chat record is "
                    '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}')
  out = []
  for k, message in enumerate(messages, 1):
    role = message.get("role") if isinstance(message, dict) else None
    if role not in templates.ROLES:
      raise DataError(f"{where}: message {k} has role {role!r}; use one of {', '.join(templates.ROLES)}")
    if not isinstance(message.get("content"), str):
      raise DataError(f"{where}: message {k} ({role}) has no 'content' string; give every message its text")
    out.append(Message(role, message["content"]))
  if not any(m.role == "assistant" for m in out):
    raise DataError(f"{where} has no assistant message, so nothing to train on; add the response or drop the record")
  return Conversation(tuple(out), where)


def instruction_examples(scheme: str, pattern: str, data_format: str) -> list[Conversation]:
  make = _alpaca_example if data_format == "alpaca" else _chat_example
  return [make(record, where) for path in files(scheme, pattern) for where, record in _records(scheme, path)]


def tsv_sentences(pattern: str, num_classes: int) -> list[Sentence]:
  """The rows of every file under a header line; labels checked against the classes when known (> 0)."""
  out = []
  for path in files("tsv", pattern):
    lines = read_text(path).splitlines()
    header = lines[0].split("\t") if lines else []
    if len(header) == 2 and header[1].strip().lstrip("-").isdigit():
      raise DataError(f"{path}:1 looks like a data row, not a header; add a first line sentence<TAB>label")
    rows = [(number, line) for number, line in enumerate(lines[1:], 2) if line.strip()]
    if not rows:
      raise DataError(f"{path} holds no rows after its header; add lines of sentence<TAB>label or leave it out")
    for number, line in rows:
      where = f"{path}:{number}"
      text, tab, label = line.rpartition("\t")
      if not tab:
        raise DataError(f"{where}: no tab in {line[:40]!r}; each row is sentence<TAB>label")
      try:
        value = int(label.strip())
      except ValueError:
        raise DataError(f"{where}: label {label.strip()!r} is not an integer; write the class number 0..C-1") from None
      if value < 0 or (num_classes > 0 and value >= num_classes):
        raise DataError(f"{where}: label {value} is outside the classes 0..{num_classes - 1}; fix the row or set "
                        f"model.num_classes to the number of classes")
      out.append(Sentence(text.strip(), value, where))
  return out
