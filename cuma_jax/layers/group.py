"""The adapters of one group of projections that read the same input, and prefix tuning."""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from cuma_jax import sharding as ax
from cuma_jax.layers import routing
from cuma_jax.layers.adapter import ROUTERS, LoraExperts
from cuma_jax.layers.adapter_config import GROUPS, AdapterConfig


def empty_aux():
  return {"balance_loss": jnp.zeros((), jnp.float32), "expert_counts": {}, "routing": {}}


def merge_aux(*auxes):
  """Sums balance losses and unions the per-router counts and decisions of several groups."""
  return {
    "balance_loss": sum(aux["balance_loss"] for aux in auxes),
    "expert_counts": {k: v for aux in auxes for k, v in aux["expert_counts"].items()},
    "routing": {k: v for aux in auxes for k, v in aux["routing"].items()},
  }


def finalize_aux(per_layer_aux):
  """Per-layer aux (stacked on a leading layer axis) -> the model's auxiliary outputs.

  ``balance_loss``: the sum over every router of every layer (docs/method.md#balance-loss);
  ``expert_counts``: ``{router: [layers, num_experts]}``; ``routing`` (only when the
  decoder captures it): ``{router: {"experts", "gates": [layers, batch, length, k]}}``.
  """
  return {**per_layer_aux, "balance_loss": jnp.sum(per_layer_aux["balance_loss"])}


class AdapterGroup(nn.Module):
  """Routers and LoRA experts of the projections that read one input ``x``.

  ``capture_routing``: also return each router's per-token decisions (experts and gates),
  for analyses of who routes where; off in training, where nothing reads them.
  """

  adapter: AdapterConfig | None
  group: str
  dtype: Any
  deterministic: bool
  capture_routing: bool = False

  @nn.compact
  def __call__(self, x, demographics, token_mask, outputs, in_axis):
    """``outputs``: {projection: (d_out, out_axis)}. Returns ({projection: delta}, aux)."""
    cfg = self.adapter
    targets = [] if cfg is None else [t for t in outputs if t in cfg.targets]
    if cfg is None or not targets:
      return {}, empty_aux()
    chex.assert_rank(x, 3)
    routings, aux = self._route(cfg, x, demographics, token_mask, targets, in_axis)
    deltas = {}
    for t in targets:
      d_out, out_axis = outputs[t]
      deltas[t] = LoraExperts(
        num_experts=cfg.num_experts,
        rank=cfg.rank,
        alpha=cfg.alpha,
        shared_a=cfg.shared_a,
        dropout=cfg.dropout,
        strategy=cfg.strategy,
        a_init=cfg.a_init,
        in_axis=in_axis,
        out_axis=out_axis,
        features=d_out,
        param_dtype=cfg.param_dtype,
        dtype=self.dtype,
        name=f"{t}_lora",
      )(x, routings[t], deterministic=self.deterministic)
    return deltas, aux

  def _route(self, cfg: AdapterConfig, x, demographics, token_mask, targets, in_axis):
    kind = ROUTERS.get(cfg.router)
    if kind.make is None:
      fixed = routing.Routing(
        gates=jnp.ones(x.shape[:-1] + (1,), jnp.float32),
        experts=jnp.zeros(x.shape[:-1] + (1,), jnp.int32),
        probs=jnp.ones(x.shape[:-1] + (1,), jnp.float32),
      )
      return {t: fixed for t in targets}, empty_aux()
    shared = cfg.share_router and len(GROUPS[self.group]) > 1
    router_keys = [self.group] if shared else targets
    by_router, losses, counts, decisions = {}, [], {}, {}
    own = {} if kind.params is None else {"params": cfg.router_kwargs}
    for key in router_keys:
      logits = kind.make(
        num_experts=cfg.num_experts,
        hidden_dims=cfg.router_hidden,
        dropout=cfg.router_dropout,
        in_axis=in_axis,
        param_dtype=cfg.param_dtype,
        name=f"{key}_router",
        **own,
      )(x, demographics, deterministic=self.deterministic)
      # A router may decide once per sequence ([B, 1, N]); every token then shares it.
      logits = jnp.broadcast_to(logits, (*x.shape[:-1], cfg.num_experts))
      r = routing.select_experts(logits, cfg.top_k, cfg.gate, cfg.gate_temperature, cfg.gate_kwargs)
      by_router[key] = r
      losses.append(routing.balance_loss(r, token_mask, cfg.num_experts, cfg.top_k, cfg.gate))
      counts[key] = routing.expert_counts(r, token_mask, cfg.num_experts)
      if self.capture_routing:
        decisions[key] = {"experts": r.experts, "gates": r.gates}
    routings = {t: by_router[self.group if shared else t] for t in targets}
    aux = {"balance_loss": sum(losses), "expert_counts": counts, "routing": decisions}
    return routings, aux


def with_prefix(module: nn.Module, adapter: AdapterConfig | None, k, v, dtype):
  """Prepends learned per-layer key/value prefixes (prefix tuning / P-tuning v2).

  The prefixes are post-rotary keys/values, exactly what a key/value cache stores, so
  they carry no position; the mask built by the decoder makes them visible to every query.
  """
  if adapter is None or not adapter.prefix_length:
    return k, v
  shape = (adapter.prefix_length,) + k.shape[2:]
  axes = (ax.PREFIX, ax.KV_HEADS, ax.HEAD_DIM)
  init = nn.with_logical_partitioning(nn.initializers.normal(adapter.prefix_init_std), axes)
  batch = k.shape[0]
  prefixed = []
  for name, seq in (("prefix_key", k), ("prefix_value", v)):
    # unbox=True (the default) spelled out: it tells type checkers the value is the array.
    prefix = module.param(name, init, shape, adapter.param_dtype, unbox=True).astype(dtype)
    prefix = jnp.broadcast_to(prefix[None], (batch,) + shape)
    prefixed.append(jnp.concatenate([prefix, seq.astype(dtype)], axis=1))
  return tuple(prefixed)
