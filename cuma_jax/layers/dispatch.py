"""The gated mixture of LoRA experts, sum_{i in top-k} g_i (x A_i) B_i, two ways.

When each is cheaper: docs/method.md#dispatch.

``mixture_dense`` runs every expert and zeroes the unselected ones through the gates:
one plain matmul over the N*r expert columns, no data movement, N/k times the needed
FLOPs. ``mixture_ragged`` sorts (token, slot) pairs by expert and runs only the selected
experts with a 2-D ``jax.lax.ragged_dot`` (per device, over its rows of the batch),
paying for a permutation of the activations instead.
Both are exact; ``resolve_strategy`` picks the cheaper for the backend and shapes.

Layouts: x [B, T, d_in]; a [d_in, r] (shared by all experts) or [N, d_in, r];
b [N, r, d_out]. Maths runs in x's dtype; gates are cast to it before they touch the
activations so nothing of size [B, T, N, r] is materialised in float32 for bf16 models.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cuma_jax.layers.routing import Routing, dense_gates
from cuma_jax.registry import Registry
from cuma_jax.sharding import BATCH

# name -> mixture(x, a, b, routing, scale) -> [B, T, d_out].  "auto" is not an entry: it
# resolves to "dense" or "ragged" by :func:`resolve_strategy`.
DISPATCH: Registry = Registry("dispatch strategy", "adapter.strategy")
AUTO = "auto"

# Accelerator FLOPs per byte of HBM traffic (H100 bf16: ~990 TFLOP/s / 3.35 TB/s; TPU
# v5p: ~459 / 2.77; both ~300). Used to price the ragged path's permutations in FLOPs.
_ACCELERATOR_FLOPS_PER_BYTE = 300.0
# Below this many tokens a call is latency bound (decode): sort + extra launches lose.
_MIN_RAGGED_TOKENS = 256


def check_strategy(strategy: str) -> None:
  if strategy != AUTO and strategy not in DISPATCH:
    raise ValueError(
      f"adapter.strategy={strategy!r}; allowed: {(*DISPATCH.names(), AUTO)} (registered "
      "dispatch strategies, or auto)"
    )


def resolve_strategy(
  strategy: str,
  *,
  backend: str,
  num_tokens: int,
  num_experts: int,
  rank: int,
  top_k: int,
) -> str:
  """Maps "auto" to the faster of "dense" and "ragged"; returns the others unchanged.

  cpu: always dense. XLA:CPU has no ragged-dot kernel, ``ragged_dot`` lowers to a masked
  dense expansion over all N groups, i.e. k times the dense path's FLOPs plus the sort
  (experiments/bench/layer.py measures it slower at every N from 8 to 64).

  gpu/tpu: ragged when the FLOPs the dense path wastes on unselected experts exceed the
  permutation traffic priced at the chip's FLOP/byte ratio. Per token, fwd+bwd (3 matmuls
  of 2 FLOPs per MAC), for every projected feature column c (d_out, plus d_in when A is
  per-expert): dense wastes 6 (N - k) r FLOPs; ragged moves ~6 k bf16 values (gather,
  unsort and their transposes) = 12 k bytes. The column count cancels, leaving
  ragged iff 6 (N - k) r > 12 k * FLOPS_PER_BYTE, i.e. (N - k) r > 600 k:
  N=8, k=2, r=64 (the paper's setting) stays dense; at k=2, r=64 ragged wins from N=21.
  Calls with fewer than 256 tokens stay dense (latency bound).
  """
  check_strategy(strategy)
  if strategy != AUTO:
    return strategy
  if backend == "cpu" or num_tokens < _MIN_RAGGED_TOKENS:
    return "dense"
  wasted_flops = 6.0 * (num_experts - top_k) * rank
  moved_bytes = 12.0 * top_k
  return "ragged" if wasted_flops > _ACCELERATOR_FLOPS_PER_BYTE * moved_bytes else "dense"


@DISPATCH.register("dense")
def mixture_dense(
  x: jax.Array, a: jax.Array, b: jax.Array, routing: Routing, scale: float = 1.0
) -> jax.Array:
  """All experts at once: gate the [.., N, r] expert inputs, then one [N*r, d_out] matmul.

  ``scale`` (LoRA's alpha/r) is folded into the gates, on the small side of the matmul.
  """
  dtype = x.dtype
  num_experts, rank, d_out = b.shape
  gates = (dense_gates(routing, num_experts) * scale).astype(dtype)
  if a.ndim == 2:
    gated = gates[..., :, None] * project("...d,dr->...r", x, a)[..., None, :]
  else:
    gated = gates[..., None] * project("...d,ndr->...nr", x, a)
  flat = gated.reshape(*x.shape[:-1], num_experts * rank)
  return project("...k,ko->...o", flat, b.reshape(num_experts * rank, d_out))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def project(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """``einsum(spec, x, w)`` in x's dtype, whose gradient w.r.t. the (float32) weight is
  accumulated in float32 and returned in w's dtype.

  Autodiff through ``w.astype(bf16)`` would form w's gradient in bfloat16 and sum it over
  the batch (across devices, too) before casting it up; here the sum over tokens is a
  float32 result, so a data-parallel reduction of it runs in float32.
  """
  return jnp.einsum(spec, x, w.astype(x.dtype))


def _project_fwd(spec, x, w):
  return project(spec, x, w), (x, w)


def _project_bwd(spec, residuals, g):
  x, w = residuals
  inputs, out = spec.split("->")
  x_spec, w_spec = inputs.split(",")
  dx = jnp.einsum(f"{out},{w_spec}->{x_spec}", g, w.astype(g.dtype)).astype(x.dtype)
  dw = jnp.einsum(f"{x_spec},{out}->{w_spec}", x, g, preferred_element_type=jnp.float32)
  return dx, dw.astype(w.dtype)


project.defvjp(_project_fwd, _project_bwd)


def _ragged_rows(x, a, b, experts, gates, scale):
  """The selected experts of the tokens x [M, d_in] (experts, gates [M, k]) -> [M, d_out].

  (token, slot) pairs are sorted by expert and each expert's run multiplied by its
  matrices with one 2-D ``ragged_dot`` (the form every backend compiles).
  """
  dtype = x.dtype
  num_experts, _, d_out = b.shape
  top_k = experts.shape[-1]
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  source = order // top_k  # token of each sorted (token, slot) pair
  group_sizes = jnp.sum(jax.nn.one_hot(flat, num_experts, dtype=jnp.int32), axis=0)
  weights = (gates.reshape(-1)[order] * scale).astype(dtype)[:, None]
  if a.ndim == 2:
    h = (x @ a.astype(dtype))[source]
  else:
    h = jax.lax.ragged_dot(x[source], a.astype(dtype), group_sizes)
  y = jax.lax.ragged_dot(h * weights, b.astype(dtype), group_sizes)
  y = y[jnp.argsort(order)]
  return y.reshape(x.shape[0], top_k, d_out).sum(axis=1)


def _batch_mesh_axes() -> tuple[str, ...]:
  """The mesh axes (of size > 1) the batch is split over, under the active mesh and rules."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  # `or`: flax's signature allows None, returned only when given no names (not the case here).
  (axes,) = nn.logical_to_mesh_axes((BATCH,)) or (None,)
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)


@DISPATCH.register("ragged")
def mixture_ragged(
  x: jax.Array, a: jax.Array, b: jax.Array, routing: Routing, scale: float = 1.0
) -> jax.Array:
  """Only the selected experts: (token, slot) pairs sorted by expert, one 2-D grouped
  matmul per projection.

  With the batch split over devices, each device sorts only its own rows (``shard_map``
  over the batch axes): no global gather. Gates multiply the r-wide expert inputs, not
  the d_out-wide outputs.
  """
  rows, tokens, d_in = x.shape
  d_out = b.shape[-1]
  top_k = routing.experts.shape[-1]

  def local(x, a, b, experts, gates):
    y = _ragged_rows(
      x.reshape(-1, d_in),
      a,
      b,
      experts.reshape(-1, top_k),
      gates.reshape(-1, top_k),
      scale,
    )
    return y.reshape(*x.shape[:-1], d_out)

  axes = _batch_mesh_axes()
  if not axes:
    return local(x, a, b, routing.experts, routing.gates)
  split = P(axes)
  return jax.shard_map(
    local,
    in_specs=(split, P(), P(), split, split),
    out_specs=split,
    axis_names=frozenset(axes),
    check_vma=False,
  )(x, a, b, routing.experts, routing.gates)


def mixture(
  x: jax.Array,
  a: jax.Array,
  b: jax.Array,
  routing: Routing,
  strategy: str = AUTO,
  scale: float = 1.0,
) -> jax.Array:
  """scale * sum_{i in top-k} g_i (x A_i) B_i as [B, T, d_out], by the chosen strategy."""
  if x.ndim != 3:
    raise ValueError(f"x must be [batch, length, features], got shape {x.shape}")
  num_experts, rank, _ = b.shape
  chex.assert_shape(a, (x.shape[-1], rank) if a.ndim == 2 else (num_experts, x.shape[-1], rank))
  chex.assert_shape(routing.probs, (*x.shape[:-1], num_experts))
  chex.assert_equal_shape([routing.gates, routing.experts])
  strategy = resolve_strategy(
    strategy,
    backend=jax.default_backend(),
    num_tokens=x.shape[0] * x.shape[1],
    num_experts=num_experts,
    rank=rank,
    top_k=routing.experts.shape[-1],
  )
  return DISPATCH.get(strategy)(x, a, b, routing, scale)
