"""The memory plan of `llm-jax inspect` against the compiled train step; one JSON line per case.

  python scripts/bench_memory.py                      # gpt-10m and tiny-llama, each remat policy, two meshes

Runs on 8 simulated CPU devices (XLA_FLAGS is set before jax loads), compiling each step from
shapes alone: `memory.plan(config)["total"]` against `memory.compiled_bytes(config)` per device.
"""

from __future__ import annotations

import json
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from llm_jax import config as config_lib  # noqa: E402  (after XLA_FLAGS)
from llm_jax.model import presets  # noqa: E402
from llm_jax.train import memory  # noqa: E402

CASES = [("gpt-10m", 8, 256), ("gpt-10m", 32, 256), ("tiny-llama", 16, 64)]
MESHES = [config_lib.MeshConfig(data=2, fsdp=2, tensor=2), config_lib.MeshConfig(data=1, fsdp=8, tensor=1)]


def main() -> None:
  for preset, batch, seq_len in CASES:
    for remat in memory.REMAT_ORDER:
      for mesh in MESHES:
        config = config_lib.Config(model=presets.get(preset), mesh=mesh, data=config_lib.DataConfig(seq_len=seq_len),
                                   train=config_lib.TrainConfig(batch_size=batch))
        config = config_lib.override(config, {"model.remat": remat})
        planned, compiled = memory.plan(config), memory.compiled_bytes(config)
        print(json.dumps({"preset": preset, "batch_size": batch, "seq_len": seq_len, "remat": remat,
                          "mesh": planned["mesh"], "planned_bytes": planned["total"], "compiled_bytes": compiled,
                          "ratio": round(planned["total"] / compiled, 3)}), flush=True)


if __name__ == "__main__":
  main()
