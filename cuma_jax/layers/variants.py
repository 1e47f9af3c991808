"""Research variants built only through the extension points, as a fork would add its own.

Each is one registration; select it with a config value:

- ``--config.adapter.gate=tempered_softmax_top_logits --config.adapter.gate_temperature=0.5``:
  softmax(top-k logits / tau).  tau < 1 sharpens the mixture towards the best expert,
  tau > 1 flattens it; tau = 1 is the paper's gate.
- ``--config.adapter.router=demographics``: routing decided from the demographic vector z
  alone (an MLP on z), so every token of a profile takes the same experts: a per-profile
  mixture of LoRAs, the test of whether token-level routing matters.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from cuma_jax.layers import adapter, routing
from cuma_jax.sharding import DEMO, EXPERTS, ROUTER_HIDDEN

routing.GATES.register(
  "tempered_softmax_top_logits",
  routing.Gate(lambda top_logits, top_probs, temperature: jax.nn.softmax(top_logits / temperature)),
)


class DemographicRouter(nn.Module):
  """logits [B, 1, N] = MLP(z): one routing decision per sequence, read from the profile.

  Same constructor as :class:`~cuma_jax.layers.adapter.Router` (``in_axis`` is unused: x
  is only read for its shape).  Layers are initialised as the token router's are.
  """

  num_experts: int
  hidden_dims: tuple[int, ...] = (256,)
  dropout: float = 0.0
  in_axis: str = ""
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, z, deterministic: bool = True):
    if z is None:
      raise ValueError("the demographics router needs the demographic vector z")
    chex.assert_rank(z, 2)
    h = z.astype(jnp.float32)
    widths = (*self.hidden_dims, self.num_experts)
    axes = (DEMO, *[ROUTER_HIDDEN] * len(self.hidden_dims), EXPERTS)
    for i, width in enumerate(widths):
      if i:
        h = jax.nn.relu(h)
      h = nn.Dropout(self.dropout)(h, deterministic)
      h = nn.Dense(
        width,
        dtype=jnp.float32,
        param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(
          adapter.torch_linear_init(h.shape[-1]), (axes[i], axes[i + 1])
        ),
        bias_init=nn.with_logical_partitioning(
          adapter.torch_linear_init(h.shape[-1]), (axes[i + 1],)
        ),
        name=f"layer{i}",
      )(h)
    return h[:, None, :]


adapter.ROUTERS.register(
  "demographics", adapter.RouterKind(DemographicRouter, reads_demographics=True)
)
