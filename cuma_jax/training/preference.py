"""Preference-alignment objectives: DPO's sigmoid loss and GRPO's group-normalised
advantages and clipped token objective as pure functions, and the training objectives
(:class:`~cuma_jax.training.step.Objective`) built on them.

Sequence log-probabilities are SUMS over the completion's tokens (the reply and its
end-of-turn), as the released DPO training computes them; the reference policy's are
computed by the same module with the adapters switched off (no second backbone).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from cuma_jax import generation
from cuma_jax.data.chat import Lengths, sequence_arrays, strip_think
from cuma_jax.params import merge_params
from cuma_jax.training.step import SFT_BATCH_KEYS, Objective, forward, supervised_positions

GRPO_LOSS_TYPES = ("dapo", "grpo")


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
  if kl_beta and ref_log_probs is not None:  # None with kl_beta was refused above
    delta = ref_log_probs - log_probs
    per_token = per_token + kl_beta * (jnp.exp(delta) - delta - 1.0)
  mask = mask.astype(jnp.float32)
  if loss_type == "dapo":
    return jnp.sum(per_token * mask) / jnp.maximum(mask.sum(), 1.0)
  per_sequence = jnp.sum(per_token * mask, axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
  return jnp.mean(per_sequence)


# ----------------------------------------------------------------------------- objectives

DPO_BATCH_KEYS = (*SFT_BATCH_KEYS, "reference_log_probs")
GRPO_BATCH_KEYS = (*SFT_BATCH_KEYS, "advantages", "rewards", "reference_token_log_probs")


def token_log_probs(module, params, batch, demographics, max_targets: int, temperature=1.0):
  """Per-token log p of the supervised targets: ([N, K] log-probs, zero where unsupervised;
  [N, K] weights; the routing outputs).  Only those positions are projected onto the
  vocabulary; dropout is off (preference training runs deterministic).  ``temperature``
  divides the logits first (GRPO scores its samples at the temperature they were drawn at)."""
  positions, weights = supervised_positions(batch["loss_mask"], max_targets)
  targets = jnp.take_along_axis(batch["targets"], positions, axis=1)
  logits, aux = forward(module, params, batch, demographics, logit_indices=positions)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  token = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return token * weights, weights, aux


def _pairs_flat(batch, demographics):
  """[B, 2, L] chosen/rejected arrays -> [2B, L] rows (chosen, rejected interleaved)."""
  flat = {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items() if v.ndim == 3}
  z = None if demographics is None else jnp.repeat(demographics, 2, axis=0)
  return flat, z


@dataclasses.dataclass(frozen=True)
class Reference:
  """The reference policy: ``module`` over the step's frozen parameters merged with
  ``params``.  The default — the policy's decoder with the adapters off, ``params`` None —
  reads the frozen backbone inside the step (no copy, sharded like it).  Fixed ``params``
  (a copy of the adapters as a stage starts; for full fine-tuning, of the whole model) are
  scored on the host before each step instead."""

  module: Any
  params: Any = None

  @property
  def in_step(self) -> bool:
    return self.params is None


def _fixed_reference(reference: Reference, max_targets: int, temperature: float = 1.0):
  """(frozen, batch, z) -> the fixed reference's per-token log-probs (jitted, parameters
  passed as arguments, never captured as constants)."""

  @jax.jit
  def run(params, frozen, batch, demographics):
    merged = merge_params(params, frozen)
    token, _, _ = token_log_probs(
      reference.module, merged, batch, demographics, max_targets, temperature
    )
    return token

  return lambda frozen, batch, z: run(reference.params, frozen, batch, z)


def _reference_tokens(reference: Reference, frozen, batch, z, max_targets, temperature=1.0):
  """The in-step reference's per-token log-probs, without gradients."""
  token = token_log_probs(reference.module, frozen, batch, z, max_targets, temperature)[0]
  return jax.lax.stop_gradient(token)


def _demographics(table, profile_index):
  return None if table is None else jnp.take(table, jnp.asarray(profile_index), axis=0)


def dpo_objective(
  module, reference: Reference, *, beta: float, lambda_aux: float, max_targets: int
) -> Objective:
  """DPO's sigmoid loss on [B, 2, L] (chosen, rejected) batches; one z per pair feeds the
  policy and the reference on both replies.  The reference's summed log-probs carry no
  gradient: computed inside the step from the frozen backbone, or before it (``prepare``)
  for a fixed reference."""
  prepare = None
  if not reference.in_step:
    prepare = functools.partial(_score_pairs, _fixed_reference(reference, max_targets))

  def loss_fn(trainable, frozen, batch, demographics, rng):
    del rng
    flat, z = _pairs_flat(batch, demographics)
    token, _, aux = token_log_probs(module, merge_params(trainable, frozen), flat, z, max_targets)
    policy = token.sum(-1).reshape(-1, 2)
    if reference.in_step:
      ref = _reference_tokens(reference, frozen, flat, z, max_targets).sum(-1).reshape(-1, 2)
    else:
      ref = batch["reference_log_probs"]
    loss, metrics = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta)
    return loss + lambda_aux * aux["balance_loss"], {
      **metrics,
      "task_loss": loss,
      "balance_loss": aux["balance_loss"],
      "expert_counts": aux["expert_counts"],
      "input_tokens": batch["attention_mask"].sum(),
    }

  return Objective(
    loss=loss_fn,
    batch_keys=SFT_BATCH_KEYS if reference.in_step else DPO_BATCH_KEYS,
    max_targets=max_targets,
    prepare=prepare,
  )


def _score_pairs(fixed, batch, trainable, frozen, table, rng):
  """DPO's ``prepare`` for a ``fixed`` reference (on the host, before each step): its summed
  log-probs of each pair's chosen and rejected replies."""
  del trainable, rng
  flat, z = _pairs_flat(batch, _demographics(table, batch["profile_index"]))
  summed = np.asarray(fixed(frozen, flat, z)).sum(-1)
  return {**batch, "reference_log_probs": summed.reshape(-1, 2).astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class Rollout:
  """How GRPO samples: ``group_size`` completions per prompt with ``sampling``; ``reward``
  maps (the prompts' example indices [N], the completions' texts [N]) to rewards [N]."""

  tokenizer: Any
  sampling: Any  # generation.SamplingConfig
  group_size: int
  reward: Callable[[np.ndarray, list[str]], np.ndarray]
  layout: Any = None  # sharding.Layout: sample split like training


def grpo_objective(
  module,
  rollout: Rollout,
  *,
  clip_epsilon: float,
  loss_type: str,
  kl_beta: float,
  reference: Reference | None,
  lambda_aux: float,
) -> Objective:
  """GRPO over prompt batches: ``prepare`` samples ``group_size`` completions per prompt
  with the current policy (z at every step), scores them, and turns them into token
  sequences with group-normalised advantages; the loss is the clipped surrogate (one
  update per sample, so the old policy is the current one, detached) plus, with
  ``kl_beta`` > 0, the KL estimate to ``reference``."""
  if loss_type not in GRPO_LOSS_TYPES:
    raise ValueError(f"loss_type={loss_type!r}; allowed: {GRPO_LOSS_TYPES}")
  if kl_beta and reference is None:
    raise ValueError("kl_beta > 0 needs a reference policy")
  new_tokens = rollout.sampling.max_new_tokens
  temperature = rollout.sampling.temperature or 1.0
  fixed, in_step_reference = None, None
  if kl_beta and reference is not None:  # None with kl_beta was refused above
    if reference.in_step:
      in_step_reference = reference
    else:
      fixed = _fixed_reference(reference, new_tokens, temperature)
  prepare = functools.partial(_sample_and_score, module, rollout, fixed)

  def loss_fn(trainable, frozen, batch, demographics, rng):
    del rng
    params = merge_params(trainable, frozen)
    token, weights, aux = token_log_probs(
      module, params, batch, demographics, new_tokens, temperature
    )
    reference_tokens = batch["reference_token_log_probs"]
    if in_step_reference is not None:
      reference_tokens = _reference_tokens(
        in_step_reference, frozen, batch, demographics, new_tokens, temperature
      )
    loss = grpo_loss(
      token,
      jax.lax.stop_gradient(token),
      batch["advantages"],
      weights,
      clip_epsilon=clip_epsilon,
      loss_type=loss_type,
      ref_log_probs=reference_tokens,
      kl_beta=kl_beta,
    )
    return loss + lambda_aux * aux["balance_loss"], {
      "task_loss": loss,
      "reward": jnp.mean(batch["rewards"]),
      "completion_tokens": jnp.sum(weights) / weights.shape[0],
      "balance_loss": aux["balance_loss"],
      "expert_counts": aux["expert_counts"],
      "input_tokens": batch["attention_mask"].sum(),
    }

  return Objective(
    loss=loss_fn, batch_keys=GRPO_BATCH_KEYS, max_targets=new_tokens, prepare=prepare
  )


def _sample_and_score(module, rollout: Rollout, fixed, batch, trainable, frozen, table, rng):
  """GRPO's ``prepare`` (on the host, before each step): samples ``group_size`` completions
  per prompt with the current policy (z at every step), scores them with ``rollout.reward``
  and lays them out as token sequences with group-normalised advantages and, for a ``fixed``
  reference, its per-token log-probs."""
  group = rollout.group_size
  new_tokens, pad = rollout.sampling.max_new_tokens, rollout.sampling.pad_token
  ids = np.repeat(batch["input_ids"], group, axis=0)
  mask = np.repeat(batch["attention_mask"], group, axis=0)
  profile_index = np.repeat(batch["profile_index"], group, axis=0)
  z = _demographics(table, profile_index)
  out = generation.generate(
    module,
    merge_params(trainable, frozen),
    ids,
    mask,
    rollout.sampling,
    demographics=z,
    rng=rng,
    layout=rollout.layout,
  )
  completions = [out.tokens[i, : out.lengths[i]].tolist() for i in range(len(ids))]
  texts = [strip_think(rollout.tokenizer.decode(c, skip_special_tokens=True)) for c in completions]
  rewards = np.asarray(rollout.reward(np.repeat(batch["example_index"], group), texts), np.float32)
  lengths = Lengths(ids.shape[1] + new_tokens, ids.shape[1], new_tokens)
  rows = [
    sequence_arrays(ids[i, mask[i] == 1].tolist(), completions[i], lengths, pad)
    for i in range(len(ids))
  ]
  sequences = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  sequences["profile_index"] = profile_index
  sequences["rewards"] = rewards
  sequences["advantages"] = np.asarray(group_advantages(jnp.asarray(rewards), group))
  if fixed is None:
    sequences["reference_token_log_probs"] = np.zeros((len(ids), new_tokens), np.float32)
  else:
    sequences["reference_token_log_probs"] = np.asarray(fixed(frozen, sequences, z))
  return sequences
