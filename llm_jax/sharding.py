"""Where every tensor is sharded: the device mesh and the one table of logical axis rules.

Parameters and activations carry logical axis names (batch, length, embed, heads, kv_heads,
head_dim, mlp, vocab, layers). `RULES` maps each name to mesh axes (data, fsdp, tensor):
FSDP shards the `embed` dimension of every weight, tensor parallelism shards heads, mlp and
vocab, and the batch is split over (data, fsdp). Changing the parallelism of a run means
changing the mesh sizes in the config, nothing else.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from llm_jax import config as config_lib
from llm_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
}


class ShardingError(UserError):
  """A parameter that cannot be laid out on the mesh as the rules say."""


def make_mesh(mesh_cfg: config_lib.MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices (of every process), with Auto axis types.

  Auto axes let XLA propagate shardings through a classic step; `jax.make_mesh`'s Explicit
  default would reject contractions over sharded dimensions.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = config_lib.resolve_mesh(mesh_cfg, len(devices))
  try:
    device_grid = mesh_utils.create_device_mesh(shape, devices)
  except (AssertionError, NotImplementedError, ValueError):  # unusual topologies: plain order
    device_grid = np.array(devices).reshape(shape)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return Mesh(device_grid, MESH_AXES, axis_types=auto)


def plan_mesh(mesh_cfg: config_lib.MeshConfig) -> jax.sharding.AbstractMesh:
  """The mesh a config asks for, without devices: `llm-jax inspect` plans a pod from a laptop.

  Explicit sizes define the device count; a -1 takes the devices this machine has.
  """
  sizes = (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
  devices = jax.device_count() if -1 in sizes else int(np.prod(sizes))
  shape = config_lib.resolve_mesh(mesh_cfg, devices)
  return jax.sharding.AbstractMesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: Sequence[str | None], rules: dict = RULES) -> P:
  """PartitionSpec for a tuple of logical axis names; raises if a mesh axis is used twice."""
  spec, used = [], set()
  for name in axes:
    mesh_axes = rules.get(name) if name is not None else None
    if name is not None and name not in rules:
      raise ShardingError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
    flat = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    collision = used.intersection(flat)
    if collision:
      raise ShardingError(f"logical axes {tuple(axes)} map mesh axis {sorted(collision)} twice; fix sharding.RULES")
    used.update(flat)
    spec.append(mesh_axes)
  return P(*spec)


def param_shardings(mesh: Mesh | jax.sharding.AbstractMesh, logical: Any, abstract: Any) -> Any:
  """NamedShardings for a tree of parameters from their logical axes, checking divisibility.

  Raises naming the parameter, its shape and the mesh when a sharded dimension does not divide.
  """
  def one(path, axes, leaf):
    spec = logical_to_spec(axes)
    for dim, mesh_axes in zip(leaf.shape, spec):
      size = int(np.prod([mesh.shape[a] for a in _flat(mesh_axes)]))
      if dim % size:
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        raise ShardingError(
            f"parameter {name} of shape {tuple(leaf.shape)} (axes {tuple(axes)}) cannot be split over mesh "
            f"{dict(mesh.shape)}: {dim} is not divisible by {size}; change the mesh or the model size")
    return NamedSharding(mesh, spec)
  return jax.tree_util.tree_map_with_path(one, logical, abstract, is_leaf=_is_axes)


def _flat(mesh_axes) -> tuple[str, ...]:
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())


def _is_axes(x: Any) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Token batches [B, L]: rows over (data, fsdp), replicated over tensor."""
  return NamedSharding(mesh, logical_to_spec(("batch", "length")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Pins an activation's sharding inside a jitted function running under `jax.set_mesh`.

  Outside a mesh (a plain single-device call) it does nothing, so the model runs either way.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes))


def describe(shardings: Any, abstract: Any) -> dict[str, dict[str, Any]]:
  """{parameter: {shape, spec, per-device shape}} for `llm-jax inspect --shardings`."""
  out = {}
  for (path, sharding), leaf in zip(jax.tree_util.tree_leaves_with_path(shardings), jax.tree.leaves(abstract)):
    out[jax.tree_util.keystr(path, simple=True, separator=".")] = {
        "shape": list(leaf.shape),
        "spec": [s if s is None or isinstance(s, str) else list(s) for s in sharding.spec],
        "shard_shape": list(sharding.shard_shape(leaf.shape)),
    }
  return out
