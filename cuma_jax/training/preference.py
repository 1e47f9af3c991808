"""Preference-alignment objectives as pure functions: DPO's sigmoid loss and GRPO's
group-normalised advantages and clipped token objective.

Sequence log-probabilities are SUMS over the completion's tokens (the reply and its
end-of-turn), as the released DPO training computes them; the reference policy's are
computed by the same module with the adapters switched off (no second backbone).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

GRPO_LOSS_TYPES = ("dapo", "grpo")


def completion_log_probs(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """[B, T, V] logits, [B, T] next-token targets and completion mask -> [B] summed log p."""
  chex.assert_rank(logits, 3)
  chex.assert_equal_shape([targets, mask])
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(token * mask.astype(jnp.float32), axis=-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1):
  """Mean over pairs of -log sigmoid(beta [(pi_c - pi_r) - (ref_c - ref_r)]); all [B].

  Returns ``(loss, metrics)``: the implicit rewards beta (pi - ref) of chosen and rejected,
  their margin and the share of pairs whose chosen reward is the larger.
  """
  chex.assert_equal_shape([policy_chosen, policy_rejected, ref_chosen, ref_rejected])
  chosen_reward = beta * (policy_chosen - ref_chosen)
  rejected_reward = beta * (policy_rejected - ref_rejected)
  margin = chosen_reward - rejected_reward
  loss = -jnp.mean(jax.nn.log_sigmoid(margin))
  return loss, {
    "chosen_reward": jnp.mean(chosen_reward),
    "rejected_reward": jnp.mean(rejected_reward),
    "reward_margin": jnp.mean(margin),
    "reward_accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
  }


def group_advantages(rewards: jax.Array, group_size: int, eps: float = 1e-4) -> jax.Array:
  """(r - group mean) / (group std + eps) for rewards [G * group_size] ordered by group.

  The std is the unbiased one (n - 1), as TRL's GRPO computes it; a group whose samples
  all score alike gets advantage 0.
  """
  if rewards.ndim != 1 or rewards.shape[0] % group_size:
    raise ValueError(f"rewards {rewards.shape} is not [groups * {group_size}]")
  grouped = rewards.reshape(-1, group_size).astype(jnp.float32)
  mean = grouped.mean(axis=1, keepdims=True)
  std = grouped.std(axis=1, keepdims=True, ddof=1)
  return ((grouped - mean) / (std + eps)).reshape(-1)


def grpo_loss(
  log_probs: jax.Array,
  old_log_probs: jax.Array,
  advantages: jax.Array,
  mask: jax.Array,
  *,
  clip_epsilon: float = 0.2,
  loss_type: str = "dapo",
  ref_log_probs: jax.Array | None = None,
  kl_beta: float = 0.0,
):
  """The clipped surrogate over completion tokens; per-token log p [B, T], advantages [B].

  Per token: -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) with ratio = p / p_old, plus,
  with ``kl_beta`` > 0, beta times the k3 estimate of KL(policy || reference):
  exp(ref - lp) - (ref - lp) - 1.  ``loss_type`` "dapo" averages over every completion
  token of the batch; "grpo" averages each sequence's tokens, then the sequences.
  """
  if loss_type not in GRPO_LOSS_TYPES:
    raise ValueError(f"loss_type={loss_type!r}; allowed: {GRPO_LOSS_TYPES}")
  if kl_beta and ref_log_probs is None:
    raise ValueError("kl_beta > 0 needs the reference policy's ref_log_probs")
  chex.assert_equal_shape([log_probs, old_log_probs, mask])
  ratio = jnp.exp(log_probs - old_log_probs)
  adv = advantages[:, None]
  clipped = jnp.clip(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon)
  per_token = -jnp.minimum(ratio * adv, clipped * adv)
  if kl_beta:
    delta = ref_log_probs - log_probs
    per_token = per_token + kl_beta * (jnp.exp(delta) - delta - 1.0)
  mask = mask.astype(jnp.float32)
  if loss_type == "dapo":
    return jnp.sum(per_token * mask) / jnp.maximum(mask.sum(), 1.0)
  per_sequence = jnp.sum(per_token * mask, axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
  return jnp.mean(per_sequence)
