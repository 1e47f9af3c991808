"""Trainable / frozen split of a parameter tree.

Training differentiates and optimises only the trainable part; the frozen backbone is
passed as a non-differentiated argument (it never gets a gradient or optimizer state) and
may stay in bfloat16 while the trainable part is kept in float32 master weights.
"""

from __future__ import annotations

from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp

from cuma_jax.api import is_adapter_path

TRAINABLE_MODES = ("adapters", "all")


def is_trainable(path: tuple[str, ...], mode: str) -> bool:
  if mode not in TRAINABLE_MODES:
    raise ValueError(f"trainable={mode!r}; allowed: {TRAINABLE_MODES}")
  return mode == "all" or is_adapter_path(path)


def partition(tree, mode: str = "adapters"):
  """Splits any tree shaped like the parameters (arrays, shardings, ...) by trainability."""
  flat = traverse_util.flatten_dict(tree)
  trainable = {p: v for p, v in flat.items() if is_trainable(p, mode)}
  if not trainable:
    raise ValueError(f"trainable={mode!r} selects no parameter: the model has no adapters")
  frozen = {p: v for p, v in flat.items() if p not in trainable}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def split_params(
  params, mode: str = "adapters", *, trainable_dtype: Any = jnp.float32, frozen_dtype: Any = None
):
  """Returns ``(trainable, frozen)`` nested dicts whose union is ``params``."""
  trainable, frozen = partition(params, mode)
  cast = lambda dtype: (lambda x: x.astype(dtype)) if dtype else (lambda x: x)
  return jax.tree.map(cast(trainable_dtype), trainable), jax.tree.map(cast(frozen_dtype), frozen)


def merge_params(trainable, frozen):
  """Inverse of :func:`split_params` (frozen leaves are stopped from gradients)."""
  flat = traverse_util.flatten_dict(jax.lax.stop_gradient(frozen)) if frozen else {}
  flat.update(traverse_util.flatten_dict(trainable))
  return traverse_util.unflatten_dict(flat)
