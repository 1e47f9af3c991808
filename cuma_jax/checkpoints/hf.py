"""Hugging Face <-> cuma_jax parameter mapping, as one declarative table.

Each row names a Hugging Face tensor (relative to the decoder, ``{i}`` = layer index), the
parameter path inside :class:`~cuma_jax.models.decoder.Decoder`, and a transform.  Import
reads one tensor at a time, checks its shape against ``jax.eval_shape`` of the module,
transforms, casts and (for scanned layers) writes it into its slot of the stacked array.
Export inverts the same rows, so import -> export is a bit-exact round trip.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import json
import operator
import os
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np

from cuma_jax.checkpoints.safetensors_io import (
  INDEX_FILE,
  SINGLE_FILE,
  TensorIndex,
  write_safetensors,
)
from cuma_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Vector:
  """Copied as is (norm scales, embeddings)."""

  def to_jax(self, tensor, shape):
    return tensor

  def hf_shape(self, shape):
    return shape

  def to_hf(self, array):
    return array


@dataclasses.dataclass(frozen=True)
class Kernel:
  """torch ``Linear.weight`` [out, in] <-> flax kernel [*in_dims, *out_dims]."""

  num_in_dims: int = 1

  def to_jax(self, tensor, shape):
    return np.ascontiguousarray(tensor.T).reshape(shape)

  def hf_shape(self, shape):
    d_in = int(np.prod(shape[: self.num_in_dims]))
    return (int(np.prod(shape[self.num_in_dims :])), d_in)

  def to_hf(self, array):
    d_in = int(np.prod(array.shape[: self.num_in_dims]))
    return np.ascontiguousarray(array.reshape(d_in, -1).T)


@dataclasses.dataclass(frozen=True)
class Bias:
  """torch bias [out] <-> flax bias [*out_dims] (e.g. [heads, head_dim])."""

  def to_jax(self, tensor, shape):
    return np.asarray(tensor).reshape(shape)

  def hf_shape(self, shape):
    return (int(np.prod(shape)),)

  def to_hf(self, array):
    return array.reshape(-1)


@dataclasses.dataclass(frozen=True)
class Rule:
  hf_name: str
  path: tuple[str, ...]
  transform: Any
  when: Callable[[ModelConfig], bool] = lambda cfg: True


def _projection_rules(module, names, num_in_dims, bias_flag):
  rules = []
  for name in names:
    rules.append(Rule(f"{module}.{name}.weight", (module, name, "kernel"), Kernel(num_in_dims)))
    rules.append(
      Rule(
        f"{module}.{name}.bias",
        (module, name, "bias"),
        Bias(),
        when=operator.attrgetter(bias_flag),
      )
    )
  return rules


LAYER_RULES: tuple[Rule, ...] = (
  Rule("input_layernorm.weight", ("input_layernorm", "scale"), Vector()),
  Rule("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), Vector()),
  *_projection_rules("self_attn", ("q_proj", "k_proj", "v_proj"), 1, "attention_bias"),
  *_projection_rules("self_attn", ("o_proj",), 2, "attention_bias"),
  Rule(
    "self_attn.q_norm.weight",
    ("self_attn", "q_norm", "scale"),
    Vector(),
    when=lambda cfg: cfg.qk_norm,
  ),
  Rule(
    "self_attn.k_norm.weight",
    ("self_attn", "k_norm", "scale"),
    Vector(),
    when=lambda cfg: cfg.qk_norm,
  ),
  *_projection_rules("mlp", ("gate_proj", "up_proj", "down_proj"), 1, "mlp_bias"),
)
MODEL_RULES: tuple[Rule, ...] = (
  Rule("embed_tokens.weight", ("embed_tokens", "embedding"), Vector()),
  Rule("norm.weight", ("norm", "scale"), Vector()),
)
LM_HEAD_RULE = Rule("lm_head.weight", ("lm_head", "kernel"), Kernel(1))
# Tensors a checkpoint may carry that the decoder derives instead of storing.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _has_lm_head(cfg: ModelConfig, output: str) -> bool:
  return output == "logits" and not cfg.tie_word_embeddings


def mapping(cfg: ModelConfig, *, output: str, scan_layers: bool, prefix: str):
  """Yields (hf_name, param_path, transform, layer_index_or_None) for every tensor."""
  for rule in MODEL_RULES:
    yield prefix + rule.hf_name, rule.path, rule.transform, None
  for i in range(cfg.num_layers):
    for rule in LAYER_RULES:
      if rule.when(cfg):
        root = ("layers",) if scan_layers else (f"layers_{i}",)
        yield (
          f"{prefix}layers.{i}.{rule.hf_name}",
          root + rule.path,
          rule.transform,
          i if scan_layers else None,
        )
  if _has_lm_head(cfg, output):
    yield LM_HEAD_RULE.hf_name, LM_HEAD_RULE.path, LM_HEAD_RULE.transform, None


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def import_params(
  directory: str | os.PathLike,
  cfg: ModelConfig,
  abstract_params,
  *,
  output: str,
  scan_layers: bool,
  dtype,
  shardings=None,
) -> dict:
  """Reads a Hugging Face safetensors checkpoint into a parameter tree.

  ``abstract_params`` is the unboxed ``jax.eval_shape`` of the module's backbone params;
  every tensor's shape is checked against it before anything is converted.  Without
  ``shardings`` the leaves are numpy arrays.  With ``shardings`` (a matching tree of
  ``jax.sharding.Sharding``) each parameter is placed onto its devices shard by shard: the
  host holds one parameter's distinct local shards at a time and no device more than its
  own shard.
  """
  index = TensorIndex(directory)
  available = set(index.names())
  prefix = "model." if any(n.startswith("model.") for n in available) else ""
  rows = list(mapping(cfg, output=output, scan_layers=scan_layers, prefix=prefix))
  expected = {row[0] for row in rows}
  missing = sorted(expected - available)
  if missing:
    raise KeyError(
      f"checkpoint {directory} is missing tensor(s) {missing[:8]}"
      f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)"
    )
  optional = {LM_HEAD_RULE.hf_name} if not _has_lm_head(cfg, output) else set()
  unexpected = sorted(
    n for n in available - expected - optional if not n.endswith(IGNORED_SUFFIXES)
  )
  if unexpected:
    raise KeyError(
      f"checkpoint {directory} has unexpected tensor(s) {unexpected[:8]}"
      f"{' ...' if len(unexpected) > 8 else ''}: it does not match the "
      f"{cfg.model_type} architecture of its config.json"
    )
  by_path: dict[tuple[str, ...], list] = {}
  for hf_name, path, transform, layer in rows:
    target_shape = tuple(_get(abstract_params, path).shape)
    if layer is not None:
      target_shape = target_shape[1:]
    want = tuple(transform.hf_shape(target_shape))
    got = index.shape(hf_name)
    if got != want:
      raise ValueError(f"tensor {hf_name!r} has shape {got}; the config implies {want}")
    by_path.setdefault(path, []).append((hf_name, transform, target_shape))
  params: dict = {}
  np_dtype = np.dtype(dtype)
  for path, tensors in by_path.items():
    shape = tuple(_get(abstract_params, path).shape)
    if shardings is None:
      _set(params, path, _read_shards(index, tensors, shape, np_dtype, [_whole(shape)])[0])
      continue
    sharding = _get(shardings, path)
    placement = sharding.addressable_devices_indices_map(shape)
    keys = [_key(idx, shape) for idx in placement.values()]
    distinct = list(dict.fromkeys(keys))
    shards = dict(
      zip(distinct, _read_shards(index, tensors, shape, np_dtype, distinct), strict=True)
    )
    arrays = [jax.device_put(shards[k], d) for d, k in zip(placement, keys, strict=True)]
    _set(params, path, jax.make_array_from_single_device_arrays(shape, sharding, arrays))
  return params


def _whole(shape) -> tuple[tuple[int, int], ...]:
  return tuple((0, n) for n in shape)


def _key(index, shape) -> tuple[tuple[int, int], ...]:
  """A device's index (a tuple of slices) as hashable (start, stop) pairs."""
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


def _read_shards(index, tensors, shape, np_dtype, keys) -> list[np.ndarray]:
  """The blocks ``keys`` of one parameter (a single tensor, or one per layer stacked)."""
  stacked = len(shape) > len(tensors[0][2])
  shards = [np.empty([stop - start for start, stop in key], np_dtype) for key in keys]
  for layer, (hf_name, transform, target_shape) in enumerate(tensors):
    value = None
    for shard, key in zip(shards, keys, strict=True):
      if stacked and not key[0][0] <= layer < key[0][1]:
        continue
      if value is None:  # Converted once, copied into every block that holds it.
        value = transform.to_jax(index.read(hf_name), target_shape)
      block = tuple(slice(start, stop) for start, stop in key)
      if stacked:
        shard[layer - key[0][0]] = value[block[1:]]
      else:
        shard[...] = value[block]
  return shards


def export_params(
  params,
  cfg: ModelConfig,
  directory: str | os.PathLike,
  *,
  output: str,
  scan_layers: bool,
  dtype=None,
  max_shard_bytes: int = 5 * 2**30,
) -> None:
  """Writes Hugging Face safetensors (sharded with an index past ``max_shard_bytes``) and
  the checkpoint's own config.json, so ``transformers`` reloads what was imported."""
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  prefix = "model." if output == "logits" else ""
  tensors = []
  for hf_name, path, transform, layer in mapping(
    cfg, output=output, scan_layers=scan_layers, prefix=prefix
  ):
    array = _get(params, path)
    if layer is not None:  # One layer of a scanned stack: slice before copying to host.
      array = array[layer]
    array = np.asarray(jax.device_get(array))
    if dtype is not None:
      array = array.astype(np.dtype(dtype))
    tensors.append((hf_name, transform.to_hf(array)))
  shards = _split(tensors, max_shard_bytes)
  if len(shards) == 1:
    write_safetensors(os.path.join(directory, SINGLE_FILE), shards[0])
  else:
    weight_map = {}
    for n, shard in enumerate(shards, 1):
      name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
      write_safetensors(os.path.join(directory, name), shard)
      weight_map.update({tensor: name for tensor, _ in shard})
    total = sum(a.nbytes for _, a in tensors)
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(directory, "config.json"), "w") as f:
    f.write(cfg.hf_config_json)


def _split(
  tensors: list[tuple[str, np.ndarray]], max_bytes: int
) -> list[list[tuple[str, np.ndarray]]]:
  """Consecutive tensors in shards of at most ``max_bytes`` (a larger tensor alone)."""
  shards: list[list[tuple[str, np.ndarray]]] = []
  current: list[tuple[str, np.ndarray]] = []
  size = 0
  for name, array in tensors:
    if current and size + array.nbytes > max_bytes:
      shards.append(current)
      current, size = [], 0
    current.append((name, array))
    size += array.nbytes
  return shards + [current]
