"""Adapter checkpoints in other libraries' layouts, as tables of tensor rows (docs/interop.md).

A format is a list of :class:`Row` s: one foreign tensor each, made of one or more of our
adapter leaves (or one expert's slice of a leaf) concatenated along their first axis and
transposed — torch ``Linear`` weights are [out, in] where ours are [in, out].  Export reads
the rows off a trained tree; import checks every tensor's name and shape against the rows
(naming what is missing or extra) and writes the pieces back, so export -> import is
bit-exact.  The rows are built per decoder layer: our parameters may be scanned (one stack
with a leading layer axis) or per layer, and both become ``{(layer, path): array}``
(:func:`unstack`).  The formats themselves are :mod:`cuma_jax.checkpoints.peft` and
:mod:`cuma_jax.checkpoints.cuma_release`; this module also reads our own (``native``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import json
import os
from typing import Any

from flax import traverse_util
import numpy as np

from cuma_jax.checkpoints.safetensors_io import TensorIndex
from cuma_jax.errors import Refusal
from cuma_jax.layers.adapter_config import GROUPS, TARGET_MODULES, AdapterConfig

# (layer index or None for a model-level parameter, path inside the layer / the model).
Key = tuple[int | None, tuple[str, ...]]
NATIVE_WEIGHTS = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
# Adapter keys that change the parameters' shapes or what the adapted model computes: those
# an imported directory fixes (dropouts, initialisers and dispatch do not).
STRUCTURAL_KEYS = (
  "targets",
  "rank",
  "alpha",
  "num_experts",
  "top_k",
  "shared_a",
  "router",
  "router_hidden",
  "demographic_dim",
  "demographic_projection",
  "share_router",
  "gate",
  "gate_temperature",
  "prefix_length",
)


class FormatError(Refusal, ValueError):
  """A directory or a run that a format cannot represent; the message names the key."""


def group_of(target: str) -> str:
  return next(g for g, members in GROUPS.items() if target in members)


def hf_module(target: str) -> str:
  """The Hugging Face submodule of a decoder layer that holds ``target``."""
  return "self_attn" if group_of(target).startswith("attn") else "mlp"


def adapter_module_path(target: str) -> tuple[str, str]:
  """Where a layer keeps ``target``'s adapters: (hf module, adapters_in / adapters_out)."""
  return hf_module(target), "adapters_" + group_of(target).split("_")[1]


def ordered_targets(adapter: AdapterConfig) -> list[str]:
  """The adapted projections in the order a Hugging Face layer registers them."""
  return [t for t in TARGET_MODULES if t in adapter.targets]


def router_name(adapter: AdapterConfig, target: str) -> str:
  """Our router module of ``target``: the group's when it shares one, else its own."""
  group = group_of(target)
  shared = adapter.share_router and len(GROUPS[group]) > 1
  return f"{group}_router" if shared else f"{target}_router"


def lora_path(target: str, leaf: str) -> tuple[str, ...]:
  return (*adapter_module_path(target), f"{target}_lora", leaf)


def router_path(adapter: AdapterConfig, target: str, leaf: str) -> tuple[str, ...]:
  return (*adapter_module_path(target), router_name(adapter, target), leaf)


@dataclasses.dataclass(frozen=True)
class Part:
  """One of our leaves, or expert ``expert``'s slice of it."""

  key: Key
  expert: int | None = None


@dataclasses.dataclass(frozen=True)
class Row:
  """A foreign tensor = transpose(concatenate(parts, axis 0))."""

  name: str
  parts: tuple[Part, ...]


def unstack(tree: dict) -> dict[Key, Any]:
  """Our adapter tree (scanned or per-layer) as ``{(layer, path): array}``."""
  out: dict[Key, Any] = {}
  for path, value in traverse_util.flatten_dict(tree).items():
    head, rest = path[0], tuple(path[1:])
    if head == "layers":
      for i in range(value.shape[0]):
        out[(i, rest)] = value[i]
    elif head.startswith("layers_"):
      out[(int(head[len("layers_") :]), rest)] = value
    else:
      out[(None, tuple(path))] = value
  return out


def restack(flat: dict[Key, Any], scan_layers: bool) -> dict:
  """Inverse of :func:`unstack` (numpy arrays)."""
  by_path: dict[tuple[str, ...], Any] = {}
  stacks: dict[tuple[str, ...], dict[int, Any]] = {}
  for (layer, path), value in flat.items():
    if layer is None:
      by_path[path] = value
    elif scan_layers:
      stacks.setdefault(("layers", *path), {})[layer] = value
    else:
      by_path[(f"layers_{layer}", *path)] = value
  for path, layers in stacks.items():
    by_path[path] = np.stack([layers[i] for i in range(len(layers))])
  return traverse_util.unflatten_dict(by_path)


def num_layers(flat: dict[Key, Any]) -> int:
  return 1 + max(layer for layer, _ in flat if layer is not None)


def _piece(flat, part: Part):
  value = np.asarray(flat[part.key])
  return value if part.expert is None else value[part.expert]


def export_rows(rows: list[Row], flat: dict[Key, Any]) -> list[tuple[str, np.ndarray]]:
  """(name, tensor) for every row, from our arrays."""
  return [
    (row.name, np.ascontiguousarray(np.concatenate([_piece(flat, p) for p in row.parts]).T))
    for row in rows
  ]


def expected_shape(row: Row, shapes: dict[Key, tuple[int, ...]]) -> tuple[int, ...]:
  pieces = [shapes[p.key][1:] if p.expert is not None else shapes[p.key] for p in row.parts]
  rows = sum(piece[0] for piece in pieces)
  return tuple(reversed((rows, *pieces[0][1:])))


def import_rows(
  rows: list[Row],
  read: Callable[[str], np.ndarray],
  available: dict[str, tuple[int, ...]],
  shapes: dict[Key, tuple[int, ...]],
  source: str,
  dtype=np.float32,
) -> dict[Key, np.ndarray]:
  """Our arrays (in ``dtype``) from foreign tensors, after checking the names and shapes.

  ``available``: {tensor name: shape} of the file; ``shapes``: our leaves' shapes.  A
  missing, extra or misshapen tensor is named before anything is converted.
  """
  expected = {row.name: expected_shape(row, shapes) for row in rows}
  missing = sorted(set(expected) - set(available))
  extra = sorted(set(available) - set(expected))
  problems = []
  if missing:
    problems.append(f"missing tensor(s) {_some(missing)} ({len(missing)} in all)")
  if extra:
    problems.append(f"extra tensor(s) {_some(extra)} ({len(extra)} in all)")
  problems += [
    f"tensor {name!r} has shape {tuple(available[name])}, expected {shape}"
    for name, shape in expected.items()
    if name in available and tuple(available[name]) != shape
  ]
  if problems:
    raise FormatError(
      f"{source} does not hold the adapters its config describes: " + "; ".join(problems[:4])
    )
  out = {key: np.zeros(shape, dtype) for key, shape in shapes.items()}
  filled = set()
  for row in rows:
    tensor = np.asarray(read(row.name)).T.astype(dtype)
    start = 0
    for part in row.parts:
      shape = shapes[part.key][1:] if part.expert is not None else shapes[part.key]
      piece = tensor[start : start + shape[0]]
      start += shape[0]
      if part.expert is None:
        out[part.key][...] = piece
      else:
        out[part.key][part.expert] = piece
      filled.add((part.key, part.expert))
  unfilled = [
    k for k, s in shapes.items() if (k, None) not in filled and not _all_experts(k, s, filled)
  ]
  if unfilled:  # the format's table misses a leaf of the module: a bug, not the user's
    raise AssertionError(f"no tensor of {source} fills our parameters {unfilled[:4]}")
  return out


def _all_experts(key, shape, filled) -> bool:
  return all((key, e) in filled for e in range(shape[0]))


def _some(names: Sequence[object]) -> str:
  return str(names[:6]) + (" ..." if len(names) > 6 else "")


def read_config(directory: str) -> dict:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory} holds no {CONFIG_FILE}: it is not an adapter directory")
  with open(path) as f:
    return json.load(f)


def detect(directory: str) -> str:
  """``peft``, ``cuma_release`` or ``native``: which layout an adapter directory is in."""
  config = read_config(directory)
  kind = config.get("peft_type")
  if kind == "LORA":
    return "peft"
  if kind == "CuMA":
    return "cuma_release"
  if kind is None and os.path.isfile(os.path.join(directory, NATIVE_WEIGHTS)):
    return "native"
  raise FormatError(
    f"{directory}: peft_type={kind!r} in its {CONFIG_FILE}; importable are PEFT LoRA "
    "(peft_type 'LORA'), the released CuMA layout ('CuMA') and cuma_jax's own export"
  )


def native_settings(directory: str) -> dict:
  """The structural adapter keys of one of our own exports."""
  config = read_config(directory)
  return {k: _tuple(config[k]) for k in STRUCTURAL_KEYS if k in config}


def _tuple(value):
  return tuple(value) if isinstance(value, list) else value


def native_import(directory: str, shapes: dict[Key, tuple[int, ...]], dtype) -> dict:
  index = TensorIndex(directory, filename=NATIVE_WEIGHTS)
  tree = {tuple(n.split("/")): np.array(index.read(n)) for n in index.names()}
  flat = unstack(traverse_util.unflatten_dict(tree))
  missing = sorted(set(shapes) - set(flat), key=str)
  extra = sorted(set(flat) - set(shapes), key=str)
  wrong = [k for k in set(shapes) & set(flat) if tuple(flat[k].shape) != tuple(shapes[k])]
  if missing or extra or wrong:
    raise FormatError(
      f"{directory}/{NATIVE_WEIGHTS} does not match the config's adapters: missing "
      f"{_some(missing)}, extra {_some(extra)}, other shape {_some(sorted(wrong, key=str))}"
    )
  return {k: v.astype(dtype) for k, v in flat.items()}
