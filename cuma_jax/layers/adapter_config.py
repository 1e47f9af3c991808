"""One configuration expresses every method: which projections carry adapters and how they route.

The decoder calls :class:`~cuma_jax.layers.group.AdapterGroup` at four places per layer, each
a set of projections that read the same input: ``attn_in`` (q/k/v), ``attn_out`` (o),
``mlp_in`` (gate/up) and ``mlp_out`` (down).  Within a group the targets either share one
router (``share_router``) or own one each.  The table below is how the paper's methods map
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

import jax.numpy as jnp

from cuma_jax.layers import dispatch, routing

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
