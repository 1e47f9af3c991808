"""The SFT objective against PyTorch's cross-entropy (label smoothing included)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cuma_jax.training.loss import masked_cross_entropy


def _batch(seed=0, rows=3, length=5, vocab=7):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(rows, length, vocab)).astype(np.float32) * 3
  targets = rng.integers(0, vocab, size=(rows, length))
  weights = (rng.random((rows, length)) < 0.6).astype(np.float32)
  weights[0, 0] = 1.0  # at least one supervised token
  return logits, targets, weights


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_mean_over_supervised_tokens_equals_torch(label_smoothing):
  logits, targets, weights = _batch()
  loss, count = masked_cross_entropy(
    jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets), jnp.asarray(weights), label_smoothing
  )
  per_token = torch.nn.functional.cross_entropy(
    torch.tensor(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))).flatten(0, 1),
    torch.tensor(targets).flatten(),
    reduction="none",
    label_smoothing=label_smoothing,
  ).numpy()
  expected = (per_token * weights.ravel()).sum() / weights.sum()
  assert float(count) == weights.sum()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_a_batch_without_supervised_tokens_has_zero_loss():
  logits, targets, weights = _batch(seed=1)
  loss, count = masked_cross_entropy(
    jnp.asarray(logits), jnp.asarray(targets), jnp.zeros_like(jnp.asarray(weights))
  )
  assert (float(loss), float(count)) == (0.0, 0.0)
