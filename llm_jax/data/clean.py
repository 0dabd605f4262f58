"""Cleaning documents before tokenizing (`llm-jax data tokenize --clean`), each filter counted.

In this order, on each document:

  normalized       Unicode normal form NFC (or NFKC where asked): the same text always gets the same tokens
  control          control characters (category Cc) removed, except tab, line feed and carriage return
  too_short/long   documents whose length in characters, after the two above, lies outside [min_chars,
                   max_chars] dropped (a document left blank counts as too short)
  exact_duplicates documents equal to an earlier one dropped (SHA-256 of the cleaned text)
  near_duplicates  documents whose estimated Jaccard similarity to an earlier kept one reaches the
                   threshold dropped: MinHash signatures of word 5-grams (lower-cased), compared by
                   locality-sensitive hashing (`datasketch`)

Punctuation, case and stop words stay: a language model must learn them. The first three filters
see one document at a time, so they run in the tokenize workers, which also compute the hashes and
signatures; deduplication keeps the first of equal or similar documents in source order, so it
runs in one process, in order, and a rerun drops exactly the same documents.

Near-deduplication holds every kept document's signature and its LSH bands in memory (about 3 KB a
document with 128 permutations); exact deduplication holds 16 bytes a document.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import unicodedata

import numpy as np

from llm_jax.errors import UserError

COUNTS = ("normalized", "control", "too_short", "too_long", "exact_duplicates", "near_duplicates")
_KEEP_CONTROL = "\t\n\r"
_CONTROL = {c: None for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in _KEEP_CONTROL}  # category Cc
_SHINGLE_WORDS = 5
_SEED = 1  # the MinHash permutations: fixed, so signatures are the same in every process and run


class CleanError(UserError):
  """Cleaning settings that cannot work."""


@dataclasses.dataclass(frozen=True)
class CleanOptions:
  """Which filters run; the defaults are what `--clean` alone does."""

  normal_form: str = "NFC"  # "NFC", "NFKC" or "none"
  control: bool = True
  min_chars: int = 1
  max_chars: int = 0  # 0: no upper bound
  exact: bool = True
  near_threshold: float = 0.8  # 0: no near-duplicate removal
  num_perm: int = 128

  def check(self) -> None:
    if self.normal_form not in ("NFC", "NFKC", "none"):
      raise CleanError(f"--normal-form {self.normal_form}: expected NFC, NFKC or none")
    if self.min_chars < 0 or self.max_chars < 0 or (self.max_chars and self.max_chars < self.min_chars):
      raise CleanError(f"--min-chars {self.min_chars} and --max-chars {self.max_chars}: expected 0 <= min <= max "
                       "(max 0 means no upper bound)")
    if not 0 <= self.near_threshold < 1:
      raise CleanError(f"--near-threshold {self.near_threshold}: expected a Jaccard similarity in (0, 1), or 0 to "
                       "keep near duplicates")
    if self.near_threshold and importlib.util.find_spec("datasketch") is None:
      raise CleanError("near-duplicate removal needs datasketch: pip install 'llm-jax[data]' (or pass "
                       "--near-threshold 0)")


def clean_text(text: str, options: CleanOptions, counts: dict[str, int]) -> str | None:
  """The document after the per-document filters, or None when it is dropped; `counts` is updated."""
  if options.normal_form != "none":
    normal = unicodedata.normalize(options.normal_form, text)
    counts["normalized"] += normal != text
    text = normal
  if options.control:
    kept = text.translate(_CONTROL)
    counts["control"] += kept != text
    text = kept
  size = len(text) if text.strip() else 0
  if size < options.min_chars:
    counts["too_short"] += 1
    return None
  if options.max_chars and size > options.max_chars:
    counts["too_long"] += 1
    return None
  return text


def new_counts() -> dict[str, int]:
  return dict.fromkeys(COUNTS, 0)


def digest(text: str) -> bytes:
  return hashlib.sha256(text.encode("utf-8")).digest()[:16]


def signature(text: str, num_perm: int) -> np.ndarray:
  """MinHash of the document's lower-cased word 5-grams (the whole text when it has fewer words), uint32 [num_perm]."""
  words = text.lower().split()
  shingles = {" ".join(words[i:i + _SHINGLE_WORDS]) for i in range(max(1, len(words) - _SHINGLE_WORDS + 1))}
  minhash = _empty_minhash(num_perm).copy()
  minhash.update_batch([s.encode("utf-8") for s in sorted(shingles)])
  return minhash.hashvalues.astype(np.uint32)


@functools.lru_cache(maxsize=None)
def _empty_minhash(num_perm: int):
  """Making the permutations takes 10x the copy of a MinHash that has them."""
  from datasketch import MinHash
  return MinHash(num_perm=num_perm, seed=_SEED)


class Deduplicator:
  """Keeps the first of equal (by digest) or similar (by MinHash) documents, seen in source order.

  LSH finds candidates at a threshold of at most 0.9 (above that 128 permutations leave too few
  bands), and a candidate counts when its estimated Jaccard similarity reaches the threshold
  asked: so any threshold below 1 works, and LSH's false positives are not dropped.
  """

  def __init__(self, options: CleanOptions):
    self._options = options
    self._seen: set[bytes] = set()
    self._lsh = None
    self._kept: list[np.ndarray] = []  # signatures of the documents kept, by LSH key
    if options.near_threshold:
      from datasketch import MinHashLSH
      self._lsh = MinHashLSH(threshold=min(options.near_threshold, 0.9), num_perm=options.num_perm)

  def drop_reason(self, doc_digest: bytes, doc_signature: np.ndarray | None) -> str | None:
    """"exact_duplicates" or "near_duplicates" when the document goes, else None (and it is remembered)."""
    if self._options.exact:
      if doc_digest in self._seen:
        return "exact_duplicates"
      self._seen.add(doc_digest)
    if self._lsh is not None:
      from datasketch import LeanMinHash
      minhash = LeanMinHash(seed=_SEED, hashvalues=doc_signature, scheme=_empty_minhash(self._options.num_perm).scheme)
      for key in self._lsh.query(minhash):
        if np.mean(self._kept[key] == doc_signature) >= self._options.near_threshold:
          return "near_duplicates"
      self._lsh.insert(len(self._kept), minhash, check_duplication=False)
      self._kept.append(doc_signature)
    return None
