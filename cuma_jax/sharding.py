"""Logical axis names and the default rules table mapping them to mesh axes.

Every parameter and sharded activation in cuma_jax is annotated with the logical
names below (``nn.with_logical_partitioning`` / ``nn.with_logical_constraint``);
a config's ``mesh.rules`` (a sequence of ``(logical, mesh_axis_or_None)``) decides
where each one lives.  Keeping the names in one place lets a fork add a mesh axis
without touching the layers.
"""

# Backbone.
BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
VOCAB = "vocab"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
LAYERS = "layers"
NORM = "norm"
# Adapters and routers.
EXPERTS = "experts"
LORA_RANK = "lora_rank"
ROUTER_HIDDEN = "router_hidden"
DEMO = "demo"
PREFIX = "prefix"

# Default: data parallel over "data", tensor parallel over "model"; adapters and
# routers are small and replicated apart from the axes they share with the backbone.
DEFAULT_RULES = (
  (BATCH, "data"),
  (LENGTH, None),
  (EMBED, None),
  (VOCAB, "model"),
  (HEADS, "model"),
  (KV_HEADS, "model"),
  (HEAD_DIM, None),
  (MLP, "model"),
  (LAYERS, None),
  (NORM, None),
  (EXPERTS, None),
  (LORA_RANK, None),
  (ROUTER_HIDDEN, None),
  (DEMO, None),
  (PREFIX, None),
)


def make_mesh(shape, devices=None):
  """A mesh from ``((axis_name, size), ...)``; one size may be -1 (all remaining devices).

  Uses the first ``prod(sizes)`` devices, so a (1, 1) mesh runs on one device even when
  more are visible.
  """
  import jax
  import numpy as np

  devices = list(jax.devices() if devices is None else devices)
  names = tuple(name for name, _ in shape)
  sizes = [int(size) for _, size in shape]
  known = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh.shape {tuple(shape)}: at most one axis may be -1")
  if -1 in sizes:
    sizes[sizes.index(-1)] = max(len(devices) // known, 1)
  total = int(np.prod(sizes))
  if total > len(devices):
    raise ValueError(
      f"mesh.shape {tuple(zip(names, sizes))} needs {total} devices; {len(devices)} are available"
    )
  return jax.sharding.Mesh(np.asarray(devices[:total]).reshape(sizes), names)


def logical_sharding(mesh, logical_axes, rules):
  """NamedSharding of an array whose dimensions carry ``logical_axes``."""
  import flax.linen as nn
  import jax

  return jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(logical_axes, rules))


def param_shardings(boxed_params, mesh, rules):
  """NamedShardings for a tree of boxed (``nn.Partitioned``) abstract parameters."""
  import flax.linen as nn

  return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_params), mesh, rules)
