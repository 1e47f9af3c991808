"""Top-k expert selection, gate semantics and the load-balancing loss (reference §2-3).

Pure functions on router logits; all maths in float32 whatever the model's compute
dtype, because gates of ~0.5 and probabilities of ~1/N lose too much in bfloat16.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

GATE_MODES = ("reference", "paper", "soft")


class Routing(NamedTuple):
  """Per-token routing decision (a pytree, so it crosses ``jit``/``vmap`` freely)."""

  gates: jax.Array  # [..., k] float32, weight of each selected expert
  experts: jax.Array  # [..., k] int32, selected expert ids, by decreasing probability
  probs: jax.Array  # [..., N] float32, softmax of the router logits


def check_routing_config(num_experts: int, top_k: int, gate_mode: str) -> None:
  """Raises ValueError naming the offending field and its allowed values."""
  if num_experts < 1:
    raise ValueError(f"num_experts must be >= 1, got {num_experts}")
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
  if gate_mode not in GATE_MODES:
    raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")


def select_experts(logits: jax.Array, top_k: int, gate_mode: str = "reference") -> Routing:
  """Picks the top-k experts of each token and weights them.

  gate_mode: "reference" (released code) renormalises the top-k PROBABILITIES with a
  second softmax, so for k=2 the larger gate stays in [0.5, 0.731]; "paper" is a
  softmax over the top-k LOGITS; "soft" keeps the raw probabilities (no renormalisation).
  """
  check_routing_config(logits.shape[-1], top_k, gate_mode)
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  top_p, experts = jax.lax.top_k(probs, top_k)
  if gate_mode == "reference":
    gates = jax.nn.softmax(top_p, axis=-1)
  elif gate_mode == "paper":
    gates = jax.nn.softmax(jnp.take_along_axis(logits, experts, axis=-1), axis=-1)
  else:
    gates = top_p
  return Routing(gates=gates, experts=experts.astype(jnp.int32), probs=probs)


def dense_gates(routing: Routing, num_experts: int) -> jax.Array:
  """[..., N] gates, zero outside the top-k (one-hot scatter, differentiable in gates)."""
  one_hot = jax.nn.one_hot(routing.experts, num_experts, dtype=routing.gates.dtype)
  return jnp.einsum("...k,...kn->...n", routing.gates, one_hot)


def _token_mask(routing: Routing, mask: jax.Array | None) -> jax.Array:
  if mask is None:
    return jnp.ones(routing.experts.shape[:-1], jnp.float32)
  return mask.astype(jnp.float32)


def balance_loss(
  routing: Routing,
  mask: jax.Array | None,
  num_experts: int,
  top_k: int,
  gate_mode: str = "reference",
) -> jax.Array:
  """L = N * sum_i P_i f_i over non-padding tokens (reference §3); scalar float32.

  f_i (share of (token, slot) assignments) is a count and carries no gradient, so the
  loss pushes only on the gate mass P_i. In soft mode the released code keeps the full
  softmax as its routing weights: f_i = 1/k and P_i is the mean probability, so the
  loss is the constant N/k (no gradient), as the reference states. T = 0 gives 0.
  """
  check_routing_config(num_experts, top_k, gate_mode)
  m = _token_mask(routing, mask)[..., None]
  num_tokens = jnp.maximum(jnp.sum(m), 1.0)
  if gate_mode == "soft":
    weights = routing.probs
    freq = jnp.full((num_experts,), 1.0 / top_k, jnp.float32)
  else:
    weights = dense_gates(routing, num_experts)
    hits = jnp.sum(m * (weights > 0), axis=tuple(range(weights.ndim - 1)))
    freq = jax.lax.stop_gradient(hits / (num_tokens * top_k))
  prop = jnp.sum(m * weights, axis=tuple(range(weights.ndim - 1))) / num_tokens
  return num_experts * jnp.sum(prop * freq)


def expert_counts(routing: Routing, mask: jax.Array | None, num_experts: int) -> jax.Array:
  """[N] float32 number of (non-padding token, slot) assignments per expert."""
  one_hot = jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32)
  weighted = one_hot * _token_mask(routing, mask)[..., None, None]
  return jnp.sum(weighted, axis=tuple(range(weighted.ndim - 1)))
