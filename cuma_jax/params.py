"""Parameter trees by path: which leaves are adapters, trainable/frozen splits, merges.

The lowest layer of the package (it imports nothing of it): the model, the trainer and the
API all ask the same two questions of a parameter path — is it an adapter? is it trained? —
and answer them here.  The trainer differentiates and optimises only the trainable part;
the frozen backbone is a non-differentiated argument (no gradient, no optimiser state) that
may stay in bfloat16 while the trainable part is kept as float32 master weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import traverse_util
import jax

TRAINABLE_MODES = ("adapters", "all")
# Top-level module names under which a layer's adapter parameters live.
ADAPTER_PREFIXES = ("adapters_", "prefix_")

Path = tuple[str, ...]


def is_adapter_path(path: Path) -> bool:
  """Adapter parameters (LoRA experts, routers, prefixes) vs the frozen backbone."""
  return any(k.startswith(ADAPTER_PREFIXES) for k in path)


def is_trainable(path: Path, mode: str) -> bool:
  if mode not in TRAINABLE_MODES:
    raise ValueError(f"trainable={mode!r}; allowed: {TRAINABLE_MODES}")
  return mode == "all" or is_adapter_path(path)


def filter_tree(tree: dict, keep: Callable[[Path], bool]) -> dict:
  """The sub-tree of leaves whose path satisfies ``keep`` (empty branches dropped)."""
  flat = traverse_util.flatten_dict(tree)
  return traverse_util.unflatten_dict({p: v for p, v in flat.items() if keep(p)})


def merge_trees(a: dict, b: dict) -> dict:
  """Union of two disjoint parameter trees (a leaf present in both is an error)."""
  flat = traverse_util.flatten_dict(a)
  for path, value in traverse_util.flatten_dict(b).items():
    if path in flat:
      raise ValueError(f"parameter {'/'.join(path)} present in both trees")
    flat[path] = value
  return traverse_util.unflatten_dict(flat)


def partition(tree, mode: str = "adapters"):
  """Splits any tree shaped like the parameters (arrays, shardings, ...) by trainability."""
  trainable = filter_tree(tree, lambda p: is_trainable(p, mode))
  if not trainable:
    raise ValueError(f"trainable={mode!r} selects no parameter: the model has no adapters")
  return trainable, filter_tree(tree, lambda p: not is_trainable(p, mode))


def split_params(
  params, mode: str = "adapters", *, trainable_dtype: Any = "float32", frozen_dtype: Any = None
):
  """Returns ``(trainable, frozen)`` nested dicts whose union is ``params``."""
  trainable, frozen = partition(params, mode)

  def cast(dtype):
    return (lambda x: x.astype(dtype)) if dtype else (lambda x: x)

  return jax.tree.map(cast(trainable_dtype), trainable), jax.tree.map(cast(frozen_dtype), frozen)


def merge_params(trainable, frozen):
  """Inverse of :func:`split_params` (frozen leaves are stopped from gradients)."""
  return merge_trees(jax.lax.stop_gradient(frozen) if frozen else {}, trainable)
