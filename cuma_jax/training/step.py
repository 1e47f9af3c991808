"""The jitted SFT train step and the evaluation forward pass.

Only supervised positions (answer letter + end-of-turn, a handful per example) and the
last prompt position are ever projected onto the vocabulary: at Qwen3-8B scale the full
[batch, 1024, 151936] float32 logits would be 10 GB per batch of 16.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

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


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a training run optimises (SFT, DPO, GRPO) and the batches it reads.

  ``loss(trainable, frozen, batch, demographics, rng) -> (loss, metrics)``; the metrics hold
  at least ``task_loss``, ``balance_loss``, ``expert_counts`` and ``input_tokens``, and any
  further scalars are logged as they are.  ``prepare(batch, trainable, frozen, table, rng)``
  runs on the host before each step (numpy batch in, numpy batch out): GRPO samples its
  completions and scores them there, DPO computes its reference log-probabilities.
  """

  loss: Callable
  batch_keys: tuple[str, ...]
  max_targets: int = MAX_TARGETS
  prepare: Callable | None = None


SFT_BATCH_KEYS = ("input_ids", "attention_mask", "targets", "loss_mask", "profile_index")


def sft_objective(
  module, *, lambda_aux: float, label_smoothing: float, max_targets: int = MAX_TARGETS
) -> Objective:
  """Token-mean cross-entropy on the supervised targets plus the weighted balance loss.

  The batch holds ``input_ids``, ``attention_mask``, ``targets`` (targets[t] =
  input_ids[t + 1]) and ``loss_mask`` (1 where targets[t] is supervised); only the
  supervised positions (at most ``max_targets`` per row) are projected onto the vocabulary.
  """

  def loss_fn(trainable, frozen, batch, demographics, rng):
    params = merge_params(trainable, frozen)
    positions, weights = supervised_positions(batch["loss_mask"], max_targets)
    targets = jnp.take_along_axis(batch["targets"], positions, axis=1)
    logits, aux = forward(
      module,
      params,
      batch,
      demographics,
      logit_indices=positions,
      deterministic=rng is None,
      rng=rng,
    )
    task, tokens = masked_cross_entropy(logits, targets, weights, label_smoothing)
    total = task + lambda_aux * aux["balance_loss"]
    return total, {
      "task_loss": task,
      "balance_loss": aux["balance_loss"],
      "supervised_tokens": tokens,
      "expert_counts": aux["expert_counts"],
      "input_tokens": batch["attention_mask"].sum(),
    }

  return Objective(loss=loss_fn, batch_keys=SFT_BATCH_KEYS, max_targets=max_targets)


def make_train_step(objective: Objective, optimizer: optax.GradientTransformation) -> Callable:
  """(trainable, frozen, opt_state, batch, demographics, rng) -> (trainable, opt_state, metrics).

  ``demographics`` is [batch, d] or None.  Gradients exist only for ``trainable``. The
  metrics' ``state_finite`` says whether the updated trainable state and optimiser state
  hold only finite values.
  """

  def step(trainable, frozen, opt_state, batch, demographics, rng):
    (loss, metrics), grads = jax.value_and_grad(objective.loss, has_aux=True)(
      trainable, frozen, batch, demographics, rng
    )
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return (
      trainable,
      opt_state,
      {
        **metrics,
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "state_finite": all_finite((trainable, opt_state)),
      },
    )

  return step


def all_finite(tree) -> jax.Array:
  """Whether every float array of ``tree`` is finite: one on-device reduction, read on the
  host with the step's metrics, so that a state holding inf or NaN is never saved."""
  checks = [
    jnp.isfinite(x).all()
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
  ]
  return jnp.stack(checks).all() if checks else jnp.asarray(True)


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
