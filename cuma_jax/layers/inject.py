"""How adapters attach to the decoder: one configuration expresses every method.

The decoder calls :class:`AdapterGroup` at four places per layer, each a set of
projections that read the same input: ``attn_in`` (q/k/v), ``attn_out`` (o), ``mlp_in``
(gate/up) and ``mlp_out`` (down).  Within a group the targets either share one router
(``share_router``) or own one each.  The table below is how the paper's methods map
onto :class:`AdapterConfig` (see ``configs/`` for the full presets):

=============  ===========================================================
CuMA           router MLP on concat(x, z), ``demographic_dim > 0``
HydraLoRA      ``shared_a=True``, ``demographic_dim=0``
MixLoRA        ``shared_a=False``, ``router_hidden=()``, ``demographic_dim=0``,
               ``share_router=True``
LoRA           ``use_router=False``, ``num_experts=1``, ``top_k=1``
prefix tuning  ``targets=()``, ``prefix_length=32``
=============  ===========================================================
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cuma_jax import sharding as ax
from cuma_jax.layers import dispatch, routing
from cuma_jax.layers.adapter import LoraExperts, Router

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUPS = {
  "attn_in": ("q_proj", "k_proj", "v_proj"),
  "attn_out": ("o_proj",),
  "mlp_in": ("gate_proj", "up_proj"),
  "mlp_out": ("down_proj",),
}


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Adapters injected into the frozen backbone (hashable: a linen attribute)."""

  targets: tuple[str, ...] = ("q_proj", "v_proj")
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  num_experts: int = 8
  top_k: int = 2
  shared_a: bool = False
  use_router: bool = True
  router_hidden: tuple[int, ...] = (256,)
  router_dropout: float = 0.0
  demographic_dim: int = 1024
  demographic_projection: tuple[int, ...] = ()
  share_router: bool = False
  gate_mode: str = "reference"
  strategy: str = "auto"
  prefix_length: int = 0
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    object.__setattr__(self, "router_hidden", tuple(self.router_hidden))
    object.__setattr__(self, "demographic_projection", tuple(self.demographic_projection))
    unknown = [t for t in self.targets if t not in TARGET_MODULES]
    if unknown:
      raise ValueError(
        f"adapter.targets {unknown} match no projection; the projections "
        f"that exist are {TARGET_MODULES}"
      )
    if self.targets:
      if self.rank < 1:
        raise ValueError(f"adapter.rank must be >= 1, got {self.rank}")
      if self.num_experts < 1:
        raise ValueError(f"adapter.num_experts must be >= 1, got {self.num_experts}")
      routing.check_routing_config(self.num_experts, self.top_k, self.gate_mode)
      if self.strategy not in dispatch.STRATEGIES:
        raise ValueError(f"adapter.strategy={self.strategy!r}; allowed: {dispatch.STRATEGIES}")
      if not self.use_router and (self.num_experts, self.top_k) != (1, 1):
        raise ValueError(
          "adapter.use_router=False (plain LoRA) needs num_experts=1 and "
          f"top_k=1, got num_experts={self.num_experts}, top_k={self.top_k}"
        )
    if not self.targets and not self.prefix_length:
      raise ValueError("adapter has neither targets nor prefix_length: nothing to train")
    if self.demographic_dim < 0:
      raise ValueError(f"adapter.demographic_dim must be >= 0, got {self.demographic_dim}")
    if self.prefix_length < 0:
      raise ValueError(f"adapter.prefix_length must be >= 0, got {self.prefix_length}")

  @property
  def uses_demographics(self) -> bool:
    return bool(self.targets) and self.use_router and self.demographic_dim > 0


def check_demographics(adapter: AdapterConfig, demographics, batch: int):
  """Validates the [batch, demographic_dim] embeddings the routers will read."""
  if not adapter.uses_demographics:
    return None
  if demographics is None:
    raise ValueError(
      f"this adapter's routers read demographic embeddings of width "
      f"{adapter.demographic_dim}; pass demographics=[batch, "
      f"{adapter.demographic_dim}]"
    )
  if demographics.ndim != 2 or demographics.shape != (batch, adapter.demographic_dim):
    raise ValueError(
      f"demographics has shape {tuple(demographics.shape)}; expected "
      f"(batch={batch}, demographic_dim={adapter.demographic_dim})"
    )
  return demographics


def empty_aux():
  return {"balance_loss": jnp.zeros((), jnp.float32), "expert_counts": {}}


def merge_aux(*auxes):
  """Sums balance losses and unions the per-router counts of several groups."""
  counts = {}
  for aux in auxes:
    counts.update(aux["expert_counts"])
  return {"balance_loss": sum(aux["balance_loss"] for aux in auxes), "expert_counts": counts}


def finalize_aux(per_layer_aux):
  """Per-layer aux (stacked on a leading layer axis) -> the model's auxiliary outputs.

  ``balance_loss``: the sum over every router of every layer (section 3 of the spec);
  ``expert_counts``: ``{router: [layers, num_experts]}``.
  """
  return {
    "balance_loss": jnp.sum(per_layer_aux["balance_loss"]),
    "expert_counts": per_layer_aux["expert_counts"],
  }


class AdapterGroup(nn.Module):
  """Routers and LoRA experts of the projections that read one input ``x``."""

  adapter: AdapterConfig | None
  group: str
  dtype: Any
  deterministic: bool

  @nn.compact
  def __call__(self, x, demographics, token_mask, outputs, in_axis):
    """``outputs``: {projection: (d_out, out_axis)}. Returns ({projection: delta}, aux)."""
    cfg = self.adapter
    targets = [t for t in outputs if cfg is not None and t in cfg.targets]
    if not targets:
      return {}, empty_aux()
    routings, aux = self._route(x, demographics, token_mask, targets, in_axis)
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
        in_axis=in_axis,
        out_axis=out_axis,
        features=d_out,
        param_dtype=cfg.param_dtype,
        dtype=self.dtype,
        name=f"{t}_lora",
      )(x, routings[t], deterministic=self.deterministic)
    return deltas, aux

  def _route(self, x, demographics, token_mask, targets, in_axis):
    cfg = self.adapter
    if not cfg.use_router:
      fixed = routing.Routing(
        gates=jnp.ones(x.shape[:-1] + (1,), jnp.float32),
        experts=jnp.zeros(x.shape[:-1] + (1,), jnp.int32),
        probs=jnp.ones(x.shape[:-1] + (1,), jnp.float32),
      )
      return {t: fixed for t in targets}, empty_aux()
    shared = cfg.share_router and len(GROUPS[self.group]) > 1
    router_keys = [self.group] if shared else targets
    by_router, losses, counts = {}, [], {}
    for key in router_keys:
      logits = Router(
        num_experts=cfg.num_experts,
        hidden_dims=cfg.router_hidden,
        use_demographics=cfg.demographic_dim > 0,
        dropout=cfg.router_dropout,
        in_axis=in_axis,
        param_dtype=cfg.param_dtype,
        name=f"{key}_router",
      )(x, demographics, deterministic=self.deterministic)
      r = routing.select_experts(logits, cfg.top_k, cfg.gate_mode)
      by_router[key] = r
      losses.append(routing.balance_loss(r, token_mask, cfg.num_experts, cfg.top_k, cfg.gate_mode))
      counts[key] = routing.expert_counts(r, token_mask, cfg.num_experts)
    routings = {t: by_router[self.group if shared else t] for t in targets}
    return routings, {"balance_loss": sum(losses), "expert_counts": counts}


def with_prefix(module: nn.Module, adapter: AdapterConfig | None, k, v, dtype):
  """Prepends learned per-layer key/value prefixes (prefix tuning / P-tuning v2).

  The prefixes are post-rotary keys/values, exactly what a key/value cache stores, so
  they carry no position; the mask built by the decoder makes them visible to every query.
  """
  if adapter is None or not adapter.prefix_length:
    return k, v
  shape = (adapter.prefix_length,) + k.shape[2:]
  axes = (ax.PREFIX, ax.KV_HEADS, ax.HEAD_DIM)
  init = nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
  batch = k.shape[0]
  prefixed = []
  for name, seq in (("prefix_key", k), ("prefix_value", v)):
    prefix = module.param(name, init, shape, adapter.param_dtype).astype(dtype)
    prefix = jnp.broadcast_to(prefix[None], (batch,) + shape)
    prefixed.append(jnp.concatenate([prefix, seq.astype(dtype)], axis=1))
  return tuple(prefixed)
