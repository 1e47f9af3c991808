"""SFT objective: masked token cross-entropy with optional label smoothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_cross_entropy(logits, targets, weights, label_smoothing: float = 0.0):
  """Mean over supervised tokens of CE(logits, targets); logits [..., V] float32.

  Returns ``(loss, num_tokens)``; a batch with no supervised token gives loss 0.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(-1)
  weights = weights.astype(jnp.float32)
  count = weights.sum()
  return (nll * weights).sum() / jnp.maximum(count, 1.0), count
