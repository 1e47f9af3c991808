"""``adapter.init_from``: a run's adapters read from an adapter directory (docs/interop.md).

The directory is a PEFT LoRA adapter, the released CuMA layout or one of our own exports
(detected from its ``adapter_config.json``).  Its settings fix the config's structural
adapter keys: :func:`check_config` refuses a config that differs, naming each key and the
value to set, before anything is loaded; :func:`initialise` then replaces the freshly
initialised adapter parameters with the directory's, every tensor checked.
"""

from __future__ import annotations

from flax import traverse_util
import jax
import numpy as np

from cuma_jax.checkpoints import cuma_release, peft
from cuma_jax.checkpoints.adapter_formats import (
  STRUCTURAL_KEYS,
  FormatError,
  detect,
  native_import,
  native_settings,
  restack,
  unstack,
)
from cuma_jax.layers.adapter_config import GROUPS, AdapterConfig
from cuma_jax.params import filter_tree, is_adapter_path, merge_trees

SETTINGS = {
  "peft": peft.settings,
  "cuma_release": cuma_release.settings,
  "native": native_settings,
}
LOADERS = {
  "peft": peft.load,
  "cuma_release": cuma_release.load,
  "native": lambda directory, adapter, shapes, dtype: native_import(directory, shapes, dtype),
}


def _relevant(key: str, adapter: AdapterConfig) -> bool:
  """Whether ``key`` changes anything for these targets (router keys need a router, ...)."""
  routed = adapter.router != "none"
  if key == "share_router":
    return routed and any(
      len(members) > 1 and set(members) & set(adapter.targets) for members in GROUPS.values()
    )
  if key in ("router_hidden", "gate", "top_k", "demographic_projection"):
    return routed
  if key == "demographic_dim":
    return adapter.uses_demographics
  if key == "gate_temperature":
    return routed and adapter.gate not in cuma_release.GATE_OF_TOP_K_ROUTING.values()
  return key in STRUCTURAL_KEYS


def check_config(adapter: AdapterConfig) -> str | None:
  """The format of ``adapter.init_from`` (None when unset), after refusing a config whose
  structural adapter keys differ from the directory's."""
  directory = adapter.init_from
  if not directory:
    return None
  kind = detect(directory)
  wanted = SETTINGS[kind](directory)
  differing = [
    (key, value)
    for key, value in wanted.items()
    if _relevant(key, adapter) and getattr(adapter, key) != value
  ]
  if differing:
    raise FormatError(
      f"config.adapter.init_from={directory} ({kind}) holds adapters with other settings "
      "than the config's: "
      + ", ".join(
        f"adapter.{k}={getattr(adapter, k)!r} (the directory's: {v!r})" for k, v in differing
      )
      + "; set "
      + " ".join(f"--config.adapter.{k}={_flag(v)}" for k, v in differing)
    )
  return kind


def _flag(value) -> str:
  if isinstance(value, tuple):
    return "'(" + "".join(f"{_flag(v)}," for v in value) + ")'"
  return repr(value) if isinstance(value, str) else str(value)


def _shapes(tree) -> dict:
  """{(layer, path): shape} of a tree of arrays, without copying any."""
  views = jax.tree.map(lambda x: np.broadcast_to(np.zeros((), np.int8), x.shape), tree)
  return {k: tuple(v.shape) for k, v in unstack(views).items()}


def read(adapter: AdapterConfig, abstract_adapters, scan_layers: bool, dtype=np.float32) -> dict:
  """The adapter tree of ``adapter.init_from``, shaped like ``abstract_adapters``."""
  kind = check_config(adapter)
  if kind is None:
    raise ValueError("adapter.init_from is not set: there are no adapters to read")
  flat = LOADERS[kind](adapter.init_from, adapter, _shapes(abstract_adapters), dtype)
  return restack(flat, scan_layers)


def initialise(params: dict, adapter: AdapterConfig, scan_layers: bool) -> dict:
  """``params`` with its adapter leaves replaced by ``adapter.init_from``'s, each placed as
  the leaf it replaces (same dtype and sharding)."""
  current = filter_tree(params, is_adapter_path)
  imported = traverse_util.flatten_dict(read(adapter, current, scan_layers))
  placed = {}
  for path, leaf in traverse_util.flatten_dict(current).items():
    value = np.asarray(imported[path], leaf.dtype)
    placed[path] = jax.make_array_from_callback(value.shape, leaf.sharding, value.__getitem__)
  backbone = filter_tree(params, lambda p: not is_adapter_path(p))
  return merge_trees(backbone, traverse_util.unflatten_dict(placed))
