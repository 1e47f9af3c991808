"""One configuration expresses every method: which projections carry adapters and how they route.

The decoder calls :class:`~cuma_jax.layers.group.AdapterGroup` at four places per layer, each
a set of projections that read the same input: ``attn_in`` (q/k/v), ``attn_out`` (o),
``mlp_in`` (gate/up) and ``mlp_out`` (down).  Within a group the targets either share one
router (``share_router``) or own one each.  The config's ``adapter`` section is this
dataclass's fields, one key per field (``cuma_jax.schema``).  How the paper's methods map
onto it (docs/method.md#baselines-and-ablations):

=============  ===========================================================
CuMA           ``router="token_and_demographics"`` (MLP on concat(x, z))
HydraLoRA      ``shared_a=True``, ``router="token"``
MixLoRA        ``router="token"``, ``router_hidden=()``, ``share_router=True``
LoRA           ``router="none"``, ``num_experts=1``, ``top_k=1``
prefix tuning  ``targets=()``, ``prefix_length=32``
=============  ===========================================================
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from cuma_jax import fields, registry
from cuma_jax.fields import FREE, field
from cuma_jax.layers.adapter import A_INITS, ROUTERS
from cuma_jax.layers.dispatch import AUTO, DISPATCH
from cuma_jax.layers.routing import DEFAULT_GATE, GATES

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

  # The frozen projections that carry LoRA experts.
  targets: tuple[str, ...] = field(("q_proj", "v_proj"), choices=TARGET_MODULES)
  rank: int = field(8, low=1)  # rank r of each expert: A [d_in, r], B [r, d_out]
  alpha: float = field(16.0, low=0, low_open=True)  # the experts' output is scaled by alpha / rank
  dropout: float = field(0.0, low=0, high=1, high_open=True)  # on the experts' input
  num_experts: int = field(8, low=1)  # LoRA experts per projection
  top_k: int = field(2, low=1)  # experts each token is routed to
  # One A shared by the experts of a projection (HydraLoRA), each keeping its own B.
  shared_a: bool = field(False, choices=(False, True))
  # A's initialisation: "normal" (std 0.01) or PEFT LoRA's "kaiming_uniform" (U(+-1/sqrt(d_in))).
  a_init: str = field("normal", choices=tuple(A_INITS))
  # The router kind (a registered name): what computes each token's expert logits.
  router: str = field("token_and_demographics", choices=ROUTERS.names)
  # The router kind's own parameters, declared by its registration (``params``): set as
  # config.adapter.router_kwargs.NAME; unset ones take the declared defaults.
  router_kwargs: Any = field(None)
  router_hidden: tuple[int, ...] = field((256,), low=1)  # the router MLP's hidden widths
  router_dropout: float = field(0.0, low=0, high=1, high_open=True)  # before each router layer
  # Width of the demographic vector z the routers read (the encoder's output width).
  demographic_dim: int = field(1024, low=0)
  # Trainable map of z before the routers (widths of 1 or 2 dense layers; () = none).
  demographic_projection: tuple[int, ...] = field((), low=1)
  # One router for the projections that read the same input (q/k/v, gate/up).
  share_router: bool = field(False, choices=(False, True))
  # How the selected experts are weighted (a registered name; docs/method.md#gates).
  gate: str = field(DEFAULT_GATE, choices=GATES.names)
  # The gate's own parameters (config.adapter.gate_kwargs.NAME), as router_kwargs.
  gate_kwargs: Any = field(None)
  # Read by the temperature-scaled gate (``cuma_jax/layers/variants.py``).
  gate_temperature: float = field(1.0, low=0, low_open=True)
  # How tokens reach their experts (dense or ragged_dot; "auto" picks by size).
  strategy: str = field(AUTO, choices=lambda: (AUTO, *DISPATCH.names()))
  prefix_length: int = field(0, low=0)  # learned key/value prefix per layer (prefix tuning)
  # Prefix keys/values ~ normal(0, prefix_init_std): 1 is PEFT's (an nn.Embedding's) default.
  prefix_init_std: float = field(1.0, low=0, low_open=True)
  # An adapter directory whose tensors replace the initialisation: a PEFT LoRA adapter, the
  # released CuMA layout or a cuma_jax export (docs/interop.md); "" = initialise afresh.
  # Its contents are fingerprinted with the run's other inputs.
  init_from: str = field("", resume=FREE)
  # Modules imported before the config is checked: a fork's own routers and gates, which
  # register themselves on import (e.g. "experiments.fork.zonly_router").
  plugins: tuple[str, ...] = field((), resume=FREE)
  # Master weights of the trainable parameters; not a config key.
  param_dtype: Any = dataclasses.field(default=jnp.float32, metadata={"config": False})

  def __post_init__(self):
    if isinstance(self.plugins, str):
      object.__setattr__(self, "plugins", (self.plugins,))
    for name in ("targets", "router_hidden", "demographic_projection", "plugins"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    registry.import_plugins(self.plugins)
    ROUTERS.check(self.router)
    GATES.check(self.gate)
    fields.check(self, "adapter")
    for key, table, name in (("router", ROUTERS, self.router), ("gate", GATES, self.gate)):
      own = fields.params_of(
        table.get(name).params,
        getattr(self, f"{key}_kwargs"),
        f"adapter.{key}_kwargs",
        f"{table.kind} {name!r}",
      )
      object.__setattr__(self, f"{key}_kwargs", own)
    if self.targets and self.top_k > self.num_experts:
      raise ValueError(
        f"config.adapter.top_k={self.top_k} exceeds adapter.num_experts={self.num_experts}"
      )
    kind = ROUTERS.get(self.router)
    if self.targets and kind.make is None and (self.num_experts, self.top_k) != (1, 1):
      raise ValueError(
        f"config.adapter.router={self.router!r} (no router, plain LoRA) needs num_experts=1 "
        f"and top_k=1, got num_experts={self.num_experts}, top_k={self.top_k}"
      )
    if self.targets and kind.reads_demographics and self.demographic_dim < 1:
      raise ValueError(
        f"config.adapter.router={self.router!r} reads the demographic vector, but "
        "adapter.demographic_dim=0; set it to the encoder's width or use router='token'"
      )
    if not self.targets and not self.prefix_length:
      raise ValueError("adapter has neither targets nor prefix_length: nothing to train")

  @property
  def uses_demographics(self) -> bool:
    return bool(self.targets) and ROUTERS.get(self.router).reads_demographics


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
