"""Demographic encoder: a frozen Qwen3-Embedding-style decoder pooled to one vector per profile.

See docs/method.md#demographic-encoder.

Each distinct profile string is encoded once and cached (a survey has millions of rows but
only thousands of distinct profiles).  Pooling modes:

- ``mean``: mean of the last hidden states over real tokens (the default, correct);
- ``mean_unmasked``: mean over every position of the batch's padded length, as the
  released PyTorch code does (padding leaks into the mean); strings are then padded to the
  longest in their batch, exactly like ``tokenizer(..., padding=True)``, for reproduction;
- ``last_token``: the last real token's state, L2-normalised (Qwen3-Embedding's recipe).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cuma_jax.models.pretrained import load_pretrained, load_tokenizer

POOLING_MODES = ("mean", "mean_unmasked", "last_token")


def pool(hidden, mask, mode: str):
  """hidden [B, T, D] float32, mask [B, T] (right padded) -> [B, D]."""
  if mode not in POOLING_MODES:
    raise ValueError(f"pooling={mode!r}; allowed: {POOLING_MODES}")
  mask = mask.astype(hidden.dtype)
  if mode == "mean":
    return (hidden * mask[..., None]).sum(1) / jnp.maximum(mask.sum(1), 1.0)[:, None]
  if mode == "mean_unmasked":
    return hidden.mean(1)
  last = jnp.maximum(mask.sum(1).astype(jnp.int32) - 1, 0)
  vectors = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  return vectors / jnp.maximum(jnp.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


class DemographicEncoder:
  """Encodes profile strings with a frozen hidden-states decoder, caching by string."""

  def __init__(
    self,
    module,
    params,
    tokenizer,
    *,
    pooling: str = "mean",
    max_length: int = 128,
    batch_size: int = 64,
  ):
    if pooling not in POOLING_MODES:
      raise ValueError(f"pooling={pooling!r}; allowed: {POOLING_MODES}")
    if module.output != "hidden_states":
      raise ValueError("the demographic encoder needs a decoder built with output='hidden_states'")
    self.module, self.params, self.tokenizer = module, params, tokenizer
    self.pooling, self.max_length, self.batch_size = pooling, max_length, batch_size
    self.dim = module.config.hidden_size
    self._cache: dict[str, np.ndarray] = {}
    self._encode = jax.jit(self._encode_batch)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, *, dtype=jnp.float32, **kwargs):
    module, params = load_pretrained(path, dtype=dtype, output="hidden_states")
    return cls(module, params, load_tokenizer(path), **kwargs)

  def _encode_batch(self, params, ids, mask):
    hidden = self.module.apply({"params": params}, ids, attention_mask=mask)
    return pool(hidden, mask, self.pooling)

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """[len(texts), dim] float32; strings already seen are not encoded again."""
    todo = sorted({t for t in texts if t not in self._cache})
    for start in range(0, len(todo), self.batch_size):
      chunk = todo[start : start + self.batch_size]
      ids, mask = self._tokenize(chunk)
      vectors = np.asarray(self._encode(self.params, ids, mask))
      self._cache.update(zip(chunk, vectors))
    if not texts:
      return np.zeros((0, self.dim), np.float32)
    return np.stack([self._cache[t] for t in texts]).astype(np.float32)

  def _tokenize(self, texts):
    encoded = [self.tokenizer.encode(t, add_special_tokens=True)[: self.max_length] for t in texts]
    longest = max(len(e) for e in encoded)
    # Unmasked mean depends on the padded length, so it keeps the batch's longest exactly;
    # the other modes round up to a multiple of 16 to reuse compiled shapes.
    length = longest if self.pooling == "mean_unmasked" else -(-longest // 16) * 16
    pad = self.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    ids = np.full((len(texts), length), pad, np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for row, e in enumerate(encoded):
      ids[row, : len(e)] = e
      mask[row, : len(e)] = 1
    return ids, mask


class PrecomputedEncoder:
  """Demographic embeddings computed elsewhere and stored with the data.

  ``path`` is an ``.npz`` with ``profiles`` (strings) and ``embeddings`` [n, d]; asking for
  a profile the file does not hold is an error naming it.
  """

  def __init__(self, path: str | os.PathLike):
    with np.load(path, allow_pickle=False) as data:
      profiles, embeddings = data["profiles"], np.asarray(data["embeddings"], np.float32)
    if embeddings.ndim != 2 or len(profiles) != len(embeddings):
      raise ValueError(
        f"{path}: 'embeddings' must be [len(profiles), d], got "
        f"{embeddings.shape} for {len(profiles)} profiles"
      )
    self.path = os.fspath(path)
    self.dim = embeddings.shape[1]
    self._table = dict(zip(profiles.tolist(), embeddings))

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    missing = [t for t in texts if t not in self._table]
    if missing:
      raise KeyError(
        f"{self.path} has no embedding for profile {missing[0]!r} ({len(missing)} missing)"
      )
    return (
      np.stack([self._table[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)
    )


@dataclasses.dataclass
class Demographics:
  """Profile strings -> router inputs: an encoder, optionally standardised per dimension.

  Weak encoders (a tiny backbone's mean-pooled states) give nearly parallel vectors;
  centring and scaling each dimension with the TRAINING profiles' statistics (reused
  unchanged for evaluation) spreads them without peeking at evaluation profiles.
  """

  encoder: DemographicEncoder | PrecomputedEncoder
  mean: np.ndarray | float = 0.0
  std: np.ndarray | float = 1.0

  @classmethod
  def standardized(cls, encoder, train_profiles: Sequence[str]) -> Demographics:
    train = encoder.encode(list(train_profiles))
    return cls(encoder, train.mean(0), train.std(0) + 1e-6)

  def encode(self, profiles: Sequence[str]) -> np.ndarray:
    """[len(profiles), d] router inputs."""
    return (self.encoder.encode(list(profiles)) - self.mean) / self.std
