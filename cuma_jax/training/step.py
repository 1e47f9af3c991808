"""The jitted SFT train step and the evaluation forward pass.

Only supervised positions (answer letter + end-of-turn, a handful per example) and the
last prompt position are ever projected onto the vocabulary: at Qwen3-8B scale the full
[batch, 1024, 151936] float32 logits would be 10 GB per batch of 16.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from cuma_jax.params import merge_params
from cuma_jax.training.loss import masked_cross_entropy

# At most this many supervised tokens per example (a letter, an end-of-turn token and a
# little slack for tokenizers that split the letter); the data side checks it.
MAX_TARGETS = 8


def supervised_positions(loss_mask, max_targets: int = MAX_TARGETS):
  """[B, T] mask -> ([B, K] positions, [B, K] weights) of its nonzero entries."""

  def row(m):
    (idx,) = jnp.nonzero(m, size=max_targets, fill_value=0)
    return idx, jnp.take(m, idx).astype(jnp.float32) * (jnp.arange(max_targets) < m.sum())

  return jax.vmap(row)(loss_mask)


def forward(module, params, batch, demographics, *, logit_indices, deterministic=True, rng=None):
  """Logits at ``logit_indices`` and the auxiliary routing outputs (zeros without adapters)."""
  rngs = {"dropout": rng} if rng is not None else None
  out = module.apply(
    {"params": params},
    batch["input_ids"],
    attention_mask=batch["attention_mask"],
    demographics=demographics,
    deterministic=deterministic,
    logit_indices=logit_indices,
    rngs=rngs,
  )
  if module.adapter is None:
    return out, {"balance_loss": jnp.zeros((), jnp.float32), "expert_counts": {}}
  return out


def make_train_step(
  module, optimizer: optax.GradientTransformation, *, lambda_aux: float, label_smoothing: float
) -> Callable:
  """(trainable, frozen, opt_state, batch, demographics, rng) -> (trainable, opt_state, metrics).

  ``batch`` holds ``input_ids``, ``attention_mask``, ``targets`` (targets[t] =
  input_ids[t + 1]) and ``loss_mask`` (1 where targets[t] is supervised); ``demographics``
  is [batch, d] or None.  Gradients exist only for ``trainable``.
  """

  def loss_fn(trainable, frozen, batch, demographics, rng):
    params = merge_params(trainable, frozen)
    positions, weights = supervised_positions(batch["loss_mask"])
    targets = jnp.take_along_axis(batch["targets"], positions, axis=1)
    deterministic = rng is None
    logits, aux = forward(
      module,
      params,
      batch,
      demographics,
      logit_indices=positions,
      deterministic=deterministic,
      rng=rng,
    )
    task, tokens = masked_cross_entropy(logits, targets, weights, label_smoothing)
    total = task + lambda_aux * aux["balance_loss"]
    return total, {
      "loss": total,
      "task_loss": task,
      "balance_loss": aux["balance_loss"],
      "supervised_tokens": tokens,
      "expert_counts": aux["expert_counts"],
      "input_tokens": batch["attention_mask"].sum(),
    }

  def step(trainable, frozen, opt_state, batch, demographics, rng):
    grads, metrics = jax.grad(loss_fn, has_aux=True)(trainable, frozen, batch, demographics, rng)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return trainable, opt_state, metrics

  return step


def make_eval_step(module) -> Callable:
  """(params, batch, demographics) -> [B, V] logits at each example's last prompt position.

  ``prompt_length`` is that position's index (the data pipeline's convention): the logits
  there predict the answer letter.
  """

  def step(params, batch, demographics):
    last = batch["prompt_length"][:, None]
    logits, _ = forward(module, params, batch, demographics, logit_indices=last)
    return logits[:, 0]

  return step


def demographics_for(table: Any, batch) -> Any:
  """Gathers each example's demographic embedding from the per-profile table."""
  if table is None:
    return None
  return jnp.take(table, batch["profile_index"], axis=0)
