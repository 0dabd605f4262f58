"""A persistent XLA compilation cache for every `llm-jax` command, on unless the user says otherwise.

Why: a resumed run, the next evaluation of a checkpoint and every `generate` compile the same
programs again; with the cache they load them instead. `llm-jax eval --tasks piqa` on the
0.9M-parameter bench model (docs/evaluation.md) took 38.2 s without the cache, 39.2 s filling it
and 30.5 s from it (AMD EPYC, 2 cores). A hit is the executable XLA would build again, so no
figure changes. MaxText keeps such a cache by default too (its `jax_cache_dir`).

JAX reads JAX_COMPILATION_CACHE_DIR when it is imported, so the command sets it first:
$XDG_CACHE_HOME/llm-jax/xla (~/.cache/llm-jax/xla), at most 4 GiB (JAX drops the least recently
used entries beyond that). JAX's own rules apply: only compilations of 1 s or more are kept
(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS). A JAX_COMPILATION_CACHE_DIR of the user's own is left
as it is; LLM_JAX_COMPILATION_CACHE=0 turns the cache off.
"""

from __future__ import annotations

import os
import pathlib
from typing import MutableMapping

MAX_BYTES = 4 << 30


def use_default(environ: MutableMapping[str, str] = os.environ) -> str | None:
  """Points JAX at the default cache folder unless the user chose one or turned it off; returns the folder set."""
  if environ.get("LLM_JAX_COMPILATION_CACHE", "1") == "0" or "JAX_COMPILATION_CACHE_DIR" in environ:
    return None
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  folder = str(pathlib.Path(base) / "llm-jax" / "xla")
  environ["JAX_COMPILATION_CACHE_DIR"] = folder
  environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(MAX_BYTES))
  return folder
