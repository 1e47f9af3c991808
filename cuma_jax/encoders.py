"""Profile encoders: profile sentence -> the router's demographic vector z.

See docs/method.md#demographic-encoder.

- :class:`DemographicEncoder`: a frozen Qwen3-Embedding-style decoder pooled to one vector
  (the paper's encoder);
- :class:`FittedNgramEncoder`: a bag of word n-grams of the sentence, projected by a
  reduced-rank ridge regression fitted to the training split's answers (a small text encoder
  trained on the survey, for backbones too small to read a profile);
- :class:`PrecomputedEncoder`: vectors computed elsewhere.

Each distinct profile string is encoded once and cached (a survey has millions of rows but
only thousands of distinct profiles).  Pooling modes of the decoder:

- ``mean``: mean of the last hidden states over real tokens (the default, correct);
- ``mean_unmasked``: mean over every position of the batch's padded length, as the
  released PyTorch code does (padding leaks into the mean); strings are then padded to the
  longest in their batch, exactly like ``tokenizer(..., padding=True)``, for reproduction;
- ``last_token``: the last real token's state, L2-normalised (Qwen3-Embedding's recipe).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import itertools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from cuma_jax.models.pretrained import load_pretrained, load_tokenizer
from cuma_jax.sharding import Layout

POOLING_MODES = ("mean", "mean_unmasked", "last_token")
# encoder.kind: the pooled decoder, or the n-gram encoder fitted to the training answers.
ENCODER_KINDS = ("decoder", "fitted_ngrams")


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
  def from_pretrained(
    cls, path: str | os.PathLike, *, dtype=jnp.float32, layout: Layout | None = None, **kwargs
  ):
    """With ``layout``, the encoder's weights are placed on its mesh as the backbone's are."""
    module, params = load_pretrained(path, dtype=dtype, output="hidden_states", layout=layout)
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
      self._cache.update(zip(chunk, vectors, strict=True))
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


def word_ngrams(text: str) -> list[str]:
  """Lower-cased words and word bigrams: "age group: 25-34" -> age, group, 25, 34, age group, ..."""
  words = re.findall(r"\w+", text.lower())
  return words + [f"{a} {b}" for a, b in itertools.pairwise(words)]


class FittedNgramEncoder:
  """A bag-of-word-n-grams encoder fitted to a survey's training answers.

  Features: the presence of each word unigram and bigram seen in a training profile (n-grams
  first met at evaluation are ignored, so an unseen combination of seen values still
  encodes). Targets: per distinct training profile, the frequency of each answer option of
  each question (a question the profile never answered takes the population's frequencies).
  A ridge regression from features to targets, reduced to its ``dim`` leading directions
  (reduced-rank regression), keeps the parts of the profile that move its answers; the
  vectors are scaled so that the leading direction has unit variance over training profiles.
  It reads answers only: never culture labels, which a real survey does not have.
  """

  def __init__(self, vocabulary: dict[str, int], mean: np.ndarray, projection: np.ndarray):
    self.vocabulary, self.mean, self.projection = vocabulary, mean, projection
    self.dim = projection.shape[1]

  @classmethod
  def fit(
    cls,
    profiles: Sequence[str],
    questions: Sequence[int],
    options: Sequence[int],
    *,
    dim: int,
    ridge: float,
  ) -> FittedNgramEncoder:
    """``profiles[i]`` answered option ``options[i]`` of question ``questions[i]`` (indices)."""
    if not len(profiles) == len(questions) == len(options) > 0:
      raise ValueError("fitting needs one (profile, question, option) per answer, and answers")
    distinct = sorted(set(profiles))
    row = {p: i for i, p in enumerate(distinct)}
    vocabulary: dict[str, int] = {}
    for p in distinct:
      for gram in word_ngrams(p):
        vocabulary.setdefault(gram, len(vocabulary))
    question_ids, option_ids = np.asarray(questions), np.asarray(options)
    width = int(option_ids.max()) + 1
    counts = np.zeros((len(distinct), int(question_ids.max()) + 1, width))
    np.add.at(counts, (np.array([row[p] for p in profiles]), question_ids, option_ids), 1.0)
    answered = counts.sum(-1, keepdims=True)
    population = counts.sum(0) / np.maximum(counts.sum((0, 2))[:, None], 1.0)
    targets = np.where(answered > 0, counts / np.maximum(answered, 1.0), population)
    targets = targets.reshape(len(distinct), -1)
    encoder = cls(vocabulary, np.zeros(len(vocabulary)), np.zeros((len(vocabulary), 0)))
    features = encoder._features(distinct)
    mean = features.mean(0)
    x, y = features - mean, targets - targets.mean(0)
    rank = min(x.shape[0], x.shape[1], np.linalg.matrix_rank(y))
    if dim > rank:
      raise ValueError(
        f"the fitted n-gram encoder can give at most {rank} dimensions on this training "
        f"split ({len(distinct)} profiles, {len(vocabulary)} n-grams, {y.shape[1]} answer "
        f"options); set adapter.demographic_dim <= {rank}"
      )
    coefficients = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ y)
    _, singular, directions = np.linalg.svd(x @ coefficients, full_matrices=False)
    scale = max(singular[0] / np.sqrt(len(distinct)), 1e-12)
    return cls(vocabulary, mean, coefficients @ directions[:dim].T / scale)

  def _features(self, texts: Sequence[str]) -> np.ndarray:
    features = np.zeros((len(texts), len(self.vocabulary)))
    for i, text in enumerate(texts):
      columns = [self.vocabulary[g] for g in word_ngrams(text) if g in self.vocabulary]
      features[i, columns] = 1.0
    return features

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """[len(texts), dim] float32."""
    return ((self._features(list(texts)) - self.mean) @ self.projection).astype(np.float32)


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
    self._table = dict(zip(profiles.tolist(), embeddings, strict=True))

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

  encoder: DemographicEncoder | FittedNgramEncoder | PrecomputedEncoder
  mean: np.ndarray | float = 0.0
  std: np.ndarray | float = 1.0

  @classmethod
  def standardized(cls, encoder, train_profiles: Sequence[str]) -> Demographics:
    train = encoder.encode(list(train_profiles))
    return cls(encoder, train.mean(0), train.std(0) + 1e-6)

  def encode(self, profiles: Sequence[str]) -> np.ndarray:
    """[len(profiles), d] router inputs."""
    return (self.encoder.encode(list(profiles)) - self.mean) / self.std
