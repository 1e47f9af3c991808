"""Logical axis names, the mesh, and the rules presets that map the names onto it.

Every parameter and sharded activation in cuma_jax is annotated with the logical
names below (``nn.with_logical_partitioning`` / ``nn.with_logical_constraint``);
a config's ``mesh.rules_preset`` (or, with "custom", its ``mesh.rules``: pairs of
``(logical, mesh_axis_or_None)``) decides where each one lives (docs/sharding.md).
Keeping the names in one place lets a fork add a mesh axis without touching the layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
  import jax

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

# The input dimension of an adapter's A and of a router's first layer: kept apart from the
# backbone's own axis there, so tensor parallelism can split them while the backbone's
# hidden dimension stays whole.
ADAPTER_IN = "adapter_in"

# Mesh axes: "slice" (data parallel across slices, over the data-centre network), "data"
# (data parallel, weights replicated), "fsdp" (data parallel, weights sharded), "model"
# (tensor parallel).  A config names some of them with sizes; the others have size 1.
MESH_AXES = ("slice", "data", "fsdp", "model")
# The batch is split over every data-like axis.
BATCH_AXES = ("slice", "data", "fsdp")

_COMMON = (
  (BATCH, BATCH_AXES),
  (LENGTH, None),
  (HEAD_DIM, None),
  (LAYERS, None),
  (NORM, None),
  (EXPERTS, None),
  (DEMO, None),
  (PREFIX, None),
)
# Fully sharded data parallel: every matrix is split along its hidden (or MLP) dimension
# over "fsdp" and gathered layer by layer; optimiser state follows its parameter.
_FSDP = (
  (EMBED, "fsdp"),
  (MLP, "fsdp"),
  (ADAPTER_IN, "fsdp"),
  # LoRA B (experts x rank x output): along its rank, whatever the output's axis.
  (LORA_RANK, "fsdp"),
  (ROUTER_HIDDEN, None),
  (VOCAB, None),
  (HEADS, None),
  (KV_HEADS, None),
)
# Tensor parallel (Megatron): heads, MLP and vocabulary over "model"; the adapters' A and
# the routers along their input, so each device holds a slice of every adapter.
_TP = (
  (VOCAB, "model"),
  (HEADS, "model"),
  (KV_HEADS, "model"),
  (MLP, "model"),
  (ADAPTER_IN, "model"),
  (EMBED, None),
  (ROUTER_HIDDEN, None),
  (LORA_RANK, None),
)
RULES_PRESETS = {
  "dp": _COMMON
  + tuple((name, None) for name in (EMBED, VOCAB, HEADS, KV_HEADS, MLP, ADAPTER_IN, LORA_RANK))
  + ((ROUTER_HIDDEN, None),),
  "fsdp": _COMMON + _FSDP,
  # A logical axis listed twice takes the first mesh axis not already used by the array.
  "fsdp_tp": _COMMON
  + (
    (VOCAB, "model"),
    (HEADS, "model"),
    (KV_HEADS, "model"),
    (MLP, "model"),
    (ADAPTER_IN, "model"),
    (EMBED, "fsdp"),
    (ADAPTER_IN, "fsdp"),
    (MLP, "fsdp"),
    (ROUTER_HIDDEN, None),
    (LORA_RANK, None),
  ),
  "tp": _COMMON + _TP,
}
# Each preset's mesh when the config names none: all devices on the preset's axis (fsdp_tp:
# tensor parallel over 2, the rest FSDP).
DEFAULT_SHAPES = {
  "dp": (("data", -1),),
  "fsdp": (("fsdp", -1),),
  "fsdp_tp": (("fsdp", -1), ("model", 2)),
  "tp": (("model", -1),),
}


def check_axis_names(shape) -> None:
  """Refuses a mesh shape whose axes are not distinct names among MESH_AXES."""
  names = [name for name, _ in shape]
  unknown = sorted(set(names) - set(MESH_AXES))
  if unknown or len(set(names)) != len(names):
    raise ValueError(
      f"mesh.shape {tuple(shape)}: axes must be distinct names among {MESH_AXES}"
      + (f"; {unknown} are not" if unknown else "")
    )


def mesh_sizes(shape, num_devices: int) -> dict[str, int]:
  """{axis: size} over all of MESH_AXES from ``((axis, size), ...)``; one size may be -1."""
  check_axis_names(shape)
  sizes = {name: 1 for name in MESH_AXES}
  sizes.update({name: int(size) for name, size in shape})
  if list(sizes.values()).count(-1) > 1:
    raise ValueError(f"mesh.shape {tuple(shape)}: at most one axis may be -1")
  if any(size == 0 or size < -1 for size in sizes.values()):
    raise ValueError(f"mesh.shape {tuple(shape)}: sizes must be positive, or -1 to fill")
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  for name, size in sizes.items():
    if size == -1:
      if num_devices % known:
        raise ValueError(
          f"mesh.shape {tuple(shape)}: {num_devices} devices do not divide by the other axes' "
          f"product {known}"
        )
      sizes[name] = num_devices // known
  total = int(np.prod(list(sizes.values())))
  if total > num_devices:
    raise ValueError(
      f"mesh.shape {tuple(shape)} needs {total} devices; {num_devices} are available"
    )
  return sizes


def make_mesh(shape, devices=None):
  """A mesh over MESH_AXES from ``((axis_name, size), ...)`` (see :func:`mesh_sizes`).

  Uses the first ``prod(sizes)`` devices, so a one-device mesh runs on one device even
  when more are visible.  Devices in several slices get a hybrid mesh, "slice" spanning the
  slices.
  """
  import jax
  from jax.experimental import mesh_utils

  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_sizes(shape, len(devices))
  total = int(np.prod(list(sizes.values())))
  slices = {getattr(d, "slice_index", 0) for d in devices}
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(slices) > 1 and total == len(devices):
    per_slice = dict(sizes, slice=1)
    grid = mesh_utils.create_hybrid_device_mesh(
      [per_slice[a] for a in MESH_AXES],
      [sizes["slice"] if a == "slice" else 1 for a in MESH_AXES],
      devices,
    )
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)
  return jax.make_mesh(
    [sizes[a] for a in MESH_AXES], MESH_AXES, axis_types=auto, devices=devices[:total]
  )


def mesh_shape(mesh_section) -> tuple[tuple[str, int], ...]:
  """A config's mesh shape: its own, else its rules preset's."""
  return tuple(tuple(axis) for axis in mesh_section.shape) or DEFAULT_SHAPES.get(
    mesh_section.rules_preset, (("data", -1),)
  )


def mesh_rules(mesh_section) -> tuple:
  """A config's rules table: its preset's, or its own with ``rules_preset="custom"``."""
  if mesh_section.rules_preset == "custom":
    return tuple((name, _axes(axes)) for name, axes in mesh_section.rules)
  return RULES_PRESETS[mesh_section.rules_preset]


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh and the rules table that places every named dimension on it."""

  mesh: Any
  rules: tuple

  @classmethod
  def of(cls, mesh_section, devices=None) -> Layout:
    return cls(make_mesh(mesh_shape(mesh_section), devices), mesh_rules(mesh_section))

  def param_shardings(self, boxed_params):
    """NamedShardings of a tree of boxed (``nn.Partitioned``) abstract parameters."""
    return param_shardings(boxed_params, self.mesh, self.rules)

  def sharding(self, logical_axes):
    """NamedSharding of an array whose dimensions carry ``logical_axes``."""
    return logical_sharding(self.mesh, logical_axes, self.rules)

  @property
  def batch(self):
    """Where per-example arrays live: split over every data-like axis."""
    return self.sharding((BATCH,))

  @property
  def replicated(self):
    import jax

    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  @property
  def batch_split(self) -> int:
    """How many ways the batch is split (the product of its mesh axes' sizes)."""
    return int(np.prod([self.mesh.shape[a] for a in _mesh_axes_of(BATCH, self.rules)]))

  def global_batch(self, array):
    """A batch every process holds whole, as one array split over the data axes."""
    import jax

    return jax.make_array_from_callback(array.shape, self.batch, lambda index: array[index])

  @contextlib.contextmanager
  def active(self):
    """The mesh and rules in force (for jit with shardings and logical constraints)."""
    import flax.linen as nn
    import jax

    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield


def _mesh_axes_of(logical: str, rules) -> tuple[str, ...]:
  (axes,) = mesh_spec_of((logical,), rules)
  return _as_tuple(axes)


def mesh_spec_of(logical_axes, rules) -> jax.sharding.PartitionSpec:
  """The PartitionSpec over mesh axes of an array whose dimensions carry ``logical_axes``."""
  import flax.linen as nn

  spec = nn.logical_to_mesh_axes(logical_axes, rules)
  if spec is None:  # flax's answer for no names at all (a tuple of Nones gets a spec).
    raise ValueError(f"logical axes must be a sequence of names or None, not {logical_axes!r}")
  return spec


def _as_tuple(axes) -> tuple[str, ...]:
  """A PartitionSpec entry (None, a name or a tuple of names) as a tuple of names."""
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _axes(axes):
  return tuple(axes) if isinstance(axes, (list, tuple)) else axes


def indivisible(boxed_params, sizes: dict[str, int], rules) -> list[str]:
  """Where ``rules`` split a parameter dimension by a mesh size that does not divide it.

  ``boxed_params``: abstract (``nn.Partitioned``) parameters; ``sizes``: {mesh axis: size}.
  """
  from flax import traverse_util
  import flax.linen as nn

  problems = []
  specs = traverse_util.flatten_dict(nn.get_partition_spec(boxed_params))
  shapes = traverse_util.flatten_dict(nn.unbox(boxed_params))
  for path, logical in specs.items():
    mesh_spec = mesh_spec_of(logical, rules)
    # A spec shorter than the shape leaves the remaining dimensions whole: a parameter
    # declared without logical axes (a fork's plain nn.Dense) has the empty spec.
    for dim, (size, axes, name) in enumerate(
      zip(shapes[path].shape, mesh_spec, logical, strict=False)
    ):
      axes = _as_tuple(axes)
      split = int(np.prod([sizes[a] for a in axes]))
      if size % split:
        problems.append(
          f"{'/'.join(path)} dimension {dim} ({name}, size {size}) over mesh axes "
          f"{'x'.join(axes)} (size {split})"
        )
  return problems


def logical_sharding(mesh, logical_axes, rules):
  """NamedSharding of an array whose dimensions carry ``logical_axes``."""
  import jax

  return jax.sharding.NamedSharding(mesh, mesh_spec_of(logical_axes, rules))


def param_shardings(boxed_params, mesh, rules):
  """NamedShardings for a tree of boxed (``nn.Partitioned``) abstract parameters."""
  import flax.linen as nn

  return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_params), mesh, rules)
