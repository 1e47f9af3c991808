"""Top-k expert selection, gates and the load-balancing loss (docs/method.md#gates).

Pure functions on router logits; all maths in float32 whatever the model's compute
dtype, because gates of ~0.5 and probabilities of ~1/N lose too much in bfloat16.
Gates are looked up in :data:`GATES`, so a research variant registers one in its own file
and selects it with ``adapter.gate`` (see ``cuma_jax/layers/variants.py``).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from cuma_jax.registry import Registry


class Routing(NamedTuple):
  """Per-token routing decision (a pytree, so it crosses ``jit``/``vmap`` freely)."""

  gates: jax.Array  # [..., k] float32, weight of each selected expert
  experts: jax.Array  # [..., k] int32, selected expert ids, by decreasing probability
  probs: jax.Array  # [..., N] float32, softmax of the router logits


@dataclasses.dataclass(frozen=True)
class Gate:
  """How the k selected experts are weighted.

  ``weights(top_logits, top_probs, temperature) -> gates``, all [..., k] float32, the
  experts ordered by decreasing probability.  ``dense_balance``: the balance loss treats
  every expert as used with weight p_i and f_i = 1/k, as the released code does for soft
  routing; otherwise f_i counts the top-k assignments.  ``params``: the gate's own
  parameters, a frozen dataclass of :func:`cuma_jax.fields.field` s set by
  ``config.adapter.gate_kwargs``; its instance is passed as ``weights``' fourth argument.
  """

  weights: Callable[..., jax.Array]
  dense_balance: bool = False
  params: type | None = None


def register_gate(name: str, *, params: type | None = None, dense_balance: bool = False):
  """Decorator: registers ``weights`` as gate ``name`` (``adapter.gate``), with its own
  ``params`` dataclass when it has one (``adapter.gate_kwargs``)."""

  def add(weights):
    GATES.register(name, Gate(weights, dense_balance=dense_balance, params=params))
    return weights

  return add


GATES: Registry[Gate] = Registry("gate", "adapter.gate")
# The released code renormalises the top-k PROBABILITIES with a second softmax (for k=2
# the larger gate stays in [0.5, 0.731]); the default, so that runs reproduce it.
GATES.register(
  "softmax_top_probs", Gate(lambda top_logits, top_probs, t: jax.nn.softmax(top_probs, -1))
)
# The paper's equation: a softmax over the top-k LOGITS.
GATES.register(
  "softmax_top_logits", Gate(lambda top_logits, top_probs, t: jax.nn.softmax(top_logits, -1))
)
# The soft-routing ablation: the raw probabilities, no renormalisation.
GATES.register("top_probs", Gate(lambda top_logits, top_probs, t: top_probs, dense_balance=True))
DEFAULT_GATE = "softmax_top_probs"


def check_routing_config(num_experts: int, top_k: int, gate: str) -> None:
  """Raises ValueError naming the offending field and its allowed values."""
  if num_experts < 1:
    raise ValueError(f"num_experts must be >= 1, got {num_experts}")
  if not 1 <= top_k <= num_experts:
    raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
  GATES.check(gate)


def select_experts(
  logits: jax.Array,
  top_k: int,
  gate: str = DEFAULT_GATE,
  temperature: float = 1.0,
  gate_params=None,
) -> Routing:
  """Picks the top-k experts of each token (by probability) and weights them by ``gate``
  (with ``gate_params``, its parameters; None: their defaults)."""
  check_routing_config(logits.shape[-1], top_k, gate)
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  top_probs, experts = jax.lax.top_k(probs, top_k)
  top_logits = jnp.take_along_axis(logits, experts, axis=-1)
  entry = GATES.get(gate)
  if entry.params is None:
    gates = entry.weights(top_logits, top_probs, temperature)
  else:
    params = gate_params if isinstance(gate_params, entry.params) else entry.params()
    gates = entry.weights(top_logits, top_probs, temperature, params)
  chex.assert_shape(gates, experts.shape)
  return Routing(gates=gates.astype(jnp.float32), experts=experts.astype(jnp.int32), probs=probs)


def dense_gates(routing: Routing, num_experts: int) -> jax.Array:
  """[..., N] gates, zero outside the top-k (one-hot scatter, differentiable in gates)."""
  one_hot = jax.nn.one_hot(routing.experts, num_experts, dtype=routing.gates.dtype)
  return jnp.einsum("...k,...kn->...n", routing.gates, one_hot)


def _token_mask(routing: Routing, mask: jax.Array | None) -> jax.Array:
  if mask is None:
    return jnp.ones(routing.experts.shape[:-1], jnp.float32)
  chex.assert_shape(mask, routing.experts.shape[:-1])
  return mask.astype(jnp.float32)


def balance_loss(
  routing: Routing,
  mask: jax.Array | None,
  num_experts: int,
  top_k: int,
  gate: str = DEFAULT_GATE,
) -> jax.Array:
  """L = N * sum_i P_i f_i over non-padding tokens (docs/method.md#balance-loss); float32.

  f_i (share of (token, slot) assignments) is a count and carries no gradient, so the
  loss pushes only on the gate mass P_i.  For a gate with ``dense_balance`` (soft
  routing) the released code keeps the full softmax as its routing weights: f_i = 1/k and
  P_i is the mean probability, so the loss is the constant N/k (no gradient).  T = 0
  gives 0.
  """
  check_routing_config(num_experts, top_k, gate)
  chex.assert_shape(routing.probs, (*routing.experts.shape[:-1], num_experts))
  m = _token_mask(routing, mask)[..., None]
  num_tokens = jnp.maximum(jnp.sum(m), 1.0)
  if GATES.get(gate).dense_balance:
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
