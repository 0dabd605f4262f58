"""`llm-jax data tokenize`: a source's documents, optionally cleaned, into token shards (`shards.py`).

Shard k holds part k of the source (`sources.parts`: a file of text: and jsonl:, a range of
examples of tfds: and hf:). Workers tokenize parts in parallel, each streaming its documents and
writing its shard as it goes (to `shard-K.arrayrecord.tmp`, renamed when complete, then
`.progress/shard-K.json` with its counts), so memory stays flat whatever the part's size. An
interrupted run, rerun with the same settings, skips every shard whose progress file exists; a
finished one (manifest.json present) is left as it is. Nothing depends on time, worker count or
order of completion, so a rerun writes the same bytes.

With deduplication (`--clean`), a first pass computes every document's hash and MinHash signature
in parallel, then decides in source order which documents go (`clean.Deduplicator`); the decisions
are saved (`.progress/duplicates.json`) before the shards are written, so a resumed run drops
exactly the same documents without deciding again.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import pathlib
import shutil
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from llm_jax.config import DataConfig
from llm_jax.data import clean, shards, sources
from llm_jax.data.clean import CleanOptions
from llm_jax.data.shards import ShardError
from llm_jax.data.textfiles import chunk_spans
from llm_jax.data.tokenizer import Tokenizer

PROGRESS = ".progress"
_ENCODE_CHARS = 1 << 20  # text tokenized per tokenizer call


@dataclasses.dataclass(frozen=True)
class _Job:
  """What a worker needs for one part."""

  index: int
  part: sources.Part
  data: DataConfig
  tokenizer: Tokenizer
  options: CleanOptions | None
  out: str
  duplicates: dict[str, list[int]] | None = None  # {reason: ordinals within the part} that deduplication drops


def settings(data: DataConfig, tokenizer_spec: str, tokenizer: Tokenizer, options: CleanOptions | None) -> dict[str, Any]:
  """Everything that decides the shards' bytes, as the manifest records it."""
  return {"format": shards.FORMAT, "source": data.source, "text_field": data.text_field, "text_split": data.text_split,
          "chunk_chars": data.chunk_chars,
          "tokenizer": {"spec": tokenizer_spec, "fingerprint": shards.fingerprint(tokenizer),
                        "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
          "dtype": shards.token_dtype(tokenizer.vocab_size).str, "writer": shards.WRITER_OPTIONS,
          "clean": dataclasses.asdict(options) if options is not None else None}


def tokenize(data: DataConfig, tokenizer_spec: str, out: str | pathlib.Path, *, workers: int = 1,
             options: CleanOptions | None = None, examples_per_shard: int = 100_000,
             say: Callable[[str], None] = print) -> dict[str, Any]:
  """Writes (or finishes, or confirms) the shards of `data.source` in `out`; returns the manifest.

  `data.chunk_chars` must be set (the pieces are cut at tokenize time); `workers` processes tokenize
  parts in parallel (1: this process).
  """
  from llm_jax.data import tokenizer as tokenizer_lib
  if data.chunk_chars <= 0:
    raise ShardError(f"chunk_chars={data.chunk_chars}: give the piece length in characters (the pipeline's default "
                     "is 32 x data.seq_len, 8192 for seq_len 256)")
  if workers < 1 or examples_per_shard < 1:
    raise ShardError(f"--workers {workers} and --examples-per-shard {examples_per_shard} must be at least 1")
  if options is not None:
    options.check()
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_spec)
  wanted = settings(data, tokenizer_spec, tokenizer, options)
  out = pathlib.Path(out).expanduser()
  if (out / shards.MANIFEST).is_file():
    manifest = shards.read_manifest(out)
    _check_same(out, {k: manifest.get(k) for k in wanted}, wanted, "holds shards")
    say(f"llm-jax: {out} is complete ({len(manifest['shards'])} shards); nothing to do")
    return manifest
  progress = out / PROGRESS
  progress.mkdir(parents=True, exist_ok=True)
  if (progress / "settings.json").is_file():
    _check_same(out, json.loads((progress / "settings.json").read_text()), wanted, "holds an unfinished run")
  else:
    if any(p.name != PROGRESS for p in out.iterdir()):
      raise ShardError(f"--out {out} is not empty and holds no tokenize run; pass a new or empty folder")
    _write_json(progress / "settings.json", wanted)
  parts = sources.parts(data, examples_per_shard)
  dropped = _duplicates(parts, data, options, progress, workers) if _dedup(options) else {}
  jobs = [_Job(k, part, data, tokenizer, options, str(out), dropped.get(k))
          for k, part in enumerate(parts) if not (progress / f"{k:05d}.json").is_file()]
  if len(jobs) < len(parts):
    say(f"llm-jax: resuming: {len(parts) - len(jobs)} of {len(parts)} shards are done")
  for stats in _run(_write_shard, jobs, workers):
    say(f"llm-jax: {stats['file']}: {stats['documents']} documents, {stats['tokens']} tokens ({stats['part']})")
  manifest = {**wanted, "shards": [json.loads((progress / f"{k:05d}.json").read_text()) for k in range(len(parts))]}
  manifest["totals"] = {key: sum(s[key] for s in manifest["shards"]) for key in ("records", "documents", "tokens")}
  if options is not None:
    manifest["totals"]["filtered"] = {c: sum(s["filtered"][c] for s in manifest["shards"]) for c in clean.COUNTS}
  _write_json(out / shards.MANIFEST, manifest)
  shutil.rmtree(progress)
  return manifest


def _check_same(out: pathlib.Path, found: dict[str, Any], wanted: dict[str, Any], what: str) -> None:
  differ = [key for key in wanted if found.get(key) != wanted[key]]
  if differ:
    key = differ[0]
    raise ShardError(f"--out {out} {what} with other settings ({key}: {found.get(key)!r}, now {wanted[key]!r}); "
                     "pass the same settings to finish it, or a new --out")


def _dedup(options: CleanOptions | None) -> bool:
  return options is not None and (options.exact or bool(options.near_threshold))


def _write_json(path: pathlib.Path, content: Any) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")
  os.replace(tmp, path)


def _run(function: Callable[[Any], Any], jobs: list, workers: int) -> Iterator[Any]:
  """`function` over `jobs`, results in order; in this process, or `workers` spawned ones, a few jobs ahead."""
  if workers == 1 or len(jobs) <= 1:
    yield from map(function, jobs)
    return
  context = multiprocessing.get_context("spawn")  # a forked child would inherit the parent's threads' locks
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    pending = [pool.submit(function, job) for job in jobs[:2 * workers]]
    for job in jobs[2 * workers:] + [None] * min(len(jobs), 2 * workers):
      result = pending.pop(0).result()
      if job is not None:
        pending.append(pool.submit(function, job))
      yield result


def _cleaned(job: _Job, counts: dict[str, int]) -> Iterator[tuple[int, str]]:
  """(ordinal in the part, text) of the documents that the per-document filters keep."""
  for ordinal, text in enumerate(sources.part_documents(job.part, job.data)):
    if job.options is not None:
      text = clean.clean_text(text, job.options, counts)
      if text is None:
        continue
    yield ordinal, text


def _signatures(job: _Job) -> list[tuple[int, bytes, np.ndarray | None]]:
  near = job.options.near_threshold
  return [(ordinal, clean.digest(text), clean.signature(text, job.options.num_perm) if near else None)
          for ordinal, text in _cleaned(job, clean.new_counts())]


def _duplicates(parts: list[sources.Part], data: DataConfig, options: CleanOptions, progress: pathlib.Path,
                workers: int) -> dict[int, dict[str, list[int]]]:
  """{part: {reason: ordinals of its documents that deduplication drops}}, decided once and saved."""
  path = progress / "duplicates.json"
  if path.is_file():
    return {int(k): v for k, v in json.loads(path.read_text()).items()}
  dedup = clean.Deduplicator(options)
  jobs = [_Job(k, part, data, None, options, "") for k, part in enumerate(parts)]
  dropped: dict[int, dict[str, list[int]]] = {}
  for job, documents in zip(jobs, _run(_signatures, jobs, workers)):
    reasons = {"exact_duplicates": [], "near_duplicates": []}
    for ordinal, digest, signature in documents:
      reason = dedup.drop_reason(digest, signature)
      if reason:
        reasons[reason].append(ordinal)
    dropped[job.index] = reasons
  _write_json(path, {str(k): v for k, v in dropped.items()})
  return dropped


def _pieces(job: _Job, counts: dict[str, int]) -> Iterator[tuple[str, bool]]:
  duplicates = job.duplicates or {}
  for reason, ordinals in duplicates.items():
    counts[reason] += len(ordinals)
  dropped = {ordinal for ordinals in duplicates.values() for ordinal in ordinals}
  for ordinal, text in _cleaned(job, counts):
    if ordinal in dropped:
      continue
    counts["documents"] += 1
    spans = chunk_spans(text, job.data.chunk_chars)
    yield from ((text[a:b], i == len(spans) - 1) for i, (a, b) in enumerate(spans))


def _batches(pieces: Iterable[tuple[str, bool]]) -> Iterator[list[tuple[str, bool]]]:
  batch, chars = [], 0
  for piece in pieces:
    batch.append(piece)
    chars += len(piece[0])
    if chars >= _ENCODE_CHARS:
      yield batch
      batch, chars = [], 0
  if batch:
    yield batch


def _write_shard(job: _Job) -> dict[str, Any]:
  """Tokenizes one part into its shard; returns (and records in .progress) the shard's counts."""
  from array_record.python.array_record_module import ArrayRecordWriter
  out = pathlib.Path(job.out)
  name = shards.shard_name(job.index)
  dtype = shards.token_dtype(job.tokenizer.vocab_size)
  eos = job.tokenizer.eos_id
  counts = {**clean.new_counts(), "documents": 0}
  records = tokens = 0
  tmp = out / (name + ".tmp")
  writer = ArrayRecordWriter(str(tmp), shards.WRITER_OPTIONS)
  try:
    for batch in _batches(_pieces(job, counts)):
      for ids, (_, ends) in zip(job.tokenizer.encode_batch([text for text, _ in batch]), batch):
        ids = np.append(ids, eos) if ends else ids
        writer.write(np.asarray(ids, dtype).tobytes())
        records, tokens = records + 1, tokens + len(ids)
  finally:
    writer.close()
  os.replace(tmp, out / name)
  stats = {"file": name, "part": job.part.label, "records": records, "documents": counts.pop("documents"),
           "tokens": tokens}
  if job.options is not None:
    stats["filtered"] = counts
  _write_json(out / PROGRESS / f"{job.index:05d}.json", stats)
  return stats
