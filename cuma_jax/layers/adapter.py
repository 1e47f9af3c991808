"""Linen modules for CuMA's routers and LoRA experts (docs/method.md#router, #experts).

The modules only own parameters and dropout; the maths lives in ``routing`` and
``dispatch`` so it can be tested and benchmarked without Flax. Every parameter carries
logical axis names (``cuma_jax.sharding``) for the mesh rules to place.  Router kinds are
looked up in :data:`ROUTERS` (selected by ``adapter.router``).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from cuma_jax.layers.dispatch import AUTO, check_strategy, mixture
from cuma_jax.layers.routing import Routing
from cuma_jax.registry import Registry
from cuma_jax.sharding import ADAPTER_IN, DEMO, EMBED, EXPERTS, LORA_RANK, ROUTER_HIDDEN


def torch_linear_init(fan_in: int):
  """PyTorch nn.Linear's default for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  Matches the released router's initial distribution; ``fan_in`` is the full input
  width of the layer, so splitting W1 into x and z parts leaves the law unchanged.
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Router(nn.Module):
  """Token router: logits = MLP(concat(x_t, z)), computed in float32.

  hidden_dims: () is a linear router, (256,) the paper's 2-layer MLP, longer is deeper;
  as in the released code, dropout precedes every linear layer.
  The first layer's weight is stored as two blocks, ``in_x`` [d_in, h] and ``in_z``
  [d_demo, h] (same parameter count as one [(d_in + d_demo), h] matrix): z is constant
  along the sequence, so z @ W1z + b1 is computed once per sequence and broadcast,
  instead of once per token. With dropout active z's mask must differ per position, so
  that case falls back to a per-token z product.
  Without demographics (``use_demographics=False``) ``z`` is ignored.
  """

  num_experts: int
  hidden_dims: tuple[int, ...] = (256,)
  use_demographics: bool = True
  dropout: float = 0.0
  in_axis: str = ADAPTER_IN
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.num_experts < 1:
      raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
    if any(h < 1 for h in self.hidden_dims):
      raise ValueError(f"hidden_dims must all be >= 1, got {self.hidden_dims}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
    super().__post_init__()

  def _param(self, name, shape, axes, fan_in):
    init = nn.with_logical_partitioning(torch_linear_init(fan_in), axes)
    # unbox=True (the default) spelled out: it tells type checkers the value is the array.
    return self.param(name, init, shape, self.param_dtype, unbox=True).astype(jnp.float32)

  @nn.compact
  def __call__(self, x: jax.Array, z: jax.Array | None = None, deterministic: bool = True):
    if not self.use_demographics:
      z = None
    elif z is None:
      raise ValueError("Router(use_demographics=True) needs the demographic vector z")
    chex.assert_rank(x, 3)
    if z is not None:
      chex.assert_rank(z, 2)
      chex.assert_equal(z.shape[0], x.shape[0])
    drop = nn.Dropout(self.dropout)
    x = x.astype(jnp.float32)
    widths = (*self.hidden_dims, self.num_experts)
    width_axes = [ROUTER_HIDDEN] * len(self.hidden_dims) + [EXPERTS]
    d_demo = 0 if z is None else z.shape[-1]
    fan_in = x.shape[-1] + d_demo

    h = drop(x, deterministic) @ self._param(
      "in_x", (x.shape[-1], widths[0]), (self.in_axis, width_axes[0]), fan_in
    )
    bias = self._param("in_bias", (widths[0],), (width_axes[0],), fan_in)
    if z is not None:
      w_z = self._param("in_z", (d_demo, widths[0]), (DEMO, width_axes[0]), fan_in)
      z = z.astype(jnp.float32)
      if deterministic or self.dropout == 0.0:
        bias = (z @ w_z + bias)[:, None, :]  # once per sequence
      else:
        z_tokens = jnp.broadcast_to(z[:, None, :], (*x.shape[:-1], d_demo))
        bias = drop(z_tokens, deterministic) @ w_z + bias
    h = h + bias

    for i in range(1, len(widths)):
      axes = (width_axes[i - 1], width_axes[i])
      fan_in = widths[i - 1]
      h = drop(jax.nn.relu(h), deterministic)
      h = h @ self._param(f"layer{i}_w", (fan_in, widths[i]), axes, fan_in)
      h = h + self._param(f"layer{i}_bias", (widths[i],), axes[1:], fan_in)
    return h


@dataclasses.dataclass(frozen=True)
class RouterKind:
  """A router kind: how to build its module, and what it reads.

  ``make(num_experts=, hidden_dims=, dropout=, in_axis=, param_dtype=, name=)`` returns a
  module called as ``(x [B, T, d_in], z [B, d_demo] or None, deterministic)`` that gives
  logits [B, T, N] (or [B, 1, N] when every token of a sequence routes alike).  ``make``
  None is "no router": one expert always selected with gate 1 (plain LoRA).  ``params``:
  the kind's own parameters, a frozen dataclass of :func:`cuma_jax.fields.field` s set by
  ``config.adapter.router_kwargs``; ``make`` then also takes its instance as ``params=``.
  """

  make: Callable[..., nn.Module] | None
  reads_demographics: bool
  params: type | None = None


ROUTERS: Registry[RouterKind] = Registry("router kind", "adapter.router")
# CuMA: an MLP on concat(x_t, z).
ROUTERS.register("token_and_demographics", RouterKind(Router, reads_demographics=True))


def register_router(name: str, *, reads_demographics: bool, params: type | None = None):
  """Class decorator: registers a router module as kind ``name`` (``adapter.router``), with
  its own ``params`` dataclass when it has one (``adapter.router_kwargs``)."""

  def add(module):
    ROUTERS.register(name, RouterKind(module, reads_demographics, params))
    return module

  return add


# Initialisers of A (B is zero), by name (``adapter.a_init``): d_in -> initializer.
# "normal": normal(0, 0.01), the released CuMA/HydraLoRA/MixLoRA modules'. "kaiming_uniform":
# PEFT LoRA's kaiming_uniform(a=sqrt(5)) over fan_in = d_in, i.e. U(+-1/sqrt(d_in)).
A_INITS: dict[str, Callable[[int], Callable]] = {
  "normal": lambda d_in: nn.initializers.normal(stddev=0.01),
  "kaiming_uniform": torch_linear_init,
}


# HydraLoRA / MixLoRA and the no-demographics ablation: the same MLP on x_t alone.
ROUTERS.register(
  "token", RouterKind(functools.partial(Router, use_demographics=False), reads_demographics=False)
)
ROUTERS.register("none", RouterKind(None, reads_demographics=False))


class LoraExperts(nn.Module):
  """N LoRA experts on one frozen projection d_in -> ``features``; returns only the delta.

  delta = (alpha / rank) * sum_{i in top-k} g_i B_i A_i dropout(x). ``a`` is one shared
  [d_in, r] matrix (``shared_a``, HydraLoRA layout of the released scripts) or [N, d_in, r];
  ``b`` is [N, r, d_out]. A is drawn by ``a_init`` (``A_INITS``; default normal(std=0.01)) and
  B = 0 (docs/method.md#experts), so the adapted model starts exactly at the frozen one.
  ``dtype`` is the compute dtype (None: x's).
  """

  features: int
  num_experts: int
  rank: int
  alpha: float
  shared_a: bool = True
  dropout: float = 0.0
  strategy: str = AUTO
  a_init: str = "normal"
  in_axis: str = ADAPTER_IN
  out_axis: str = EMBED
  param_dtype: Any = jnp.float32
  dtype: Any = None

  def __post_init__(self):
    if self.features < 1:
      raise ValueError(f"features must be >= 1, got {self.features}")
    if self.num_experts < 1:
      raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
    if self.rank < 1:
      raise ValueError(f"rank must be >= 1, got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
    check_strategy(self.strategy)
    if self.a_init not in A_INITS:
      raise ValueError(f"a_init={self.a_init!r}; must be one of {tuple(A_INITS)}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, routing: Routing, deterministic: bool = True):
    if routing.probs.shape[-1] != self.num_experts:
      raise ValueError(
        f"routing is over {routing.probs.shape[-1]} experts, num_experts is {self.num_experts}"
      )
    d_in = x.shape[-1]
    chex.assert_rank(x, 3)
    a_shape: tuple[int, ...]
    a_axes: tuple[str, ...]
    if self.shared_a:
      a_shape, a_axes = (d_in, self.rank), (self.in_axis, LORA_RANK)
    else:
      a_shape = (self.num_experts, d_in, self.rank)
      a_axes = (EXPERTS, self.in_axis, LORA_RANK)
    a = self.param(
      "a",
      nn.with_logical_partitioning(A_INITS[self.a_init](d_in), a_axes),
      a_shape,
      self.param_dtype,
      unbox=True,  # the default, spelled out so type checkers see an array
    )
    b = self.param(
      "b",
      nn.with_logical_partitioning(
        nn.initializers.zeros_init(), (EXPERTS, LORA_RANK, self.out_axis)
      ),
      (self.num_experts, self.rank, self.features),
      self.param_dtype,
      unbox=True,
    )
    x = nn.Dropout(self.dropout)(x, deterministic).astype(self.dtype or x.dtype)
    return mixture(x, a, b, routing, self.strategy, scale=self.alpha / self.rank)
