"""A fork's variants in one file, with no edit to cuma_jax/: a sharpened gate with its own
``sharpness`` and a router that reads only the profile z, with its own hidden width and
temperature.  Train, evaluate and restore (from the repository root)::

  python -m cuma_jax.main --config=configs/cuma.py:tiny --workdir=runs/zonly \\
    --config.adapter.plugins=experiments.fork.zonly_router \\
    --config.adapter.router=zonly --config.adapter.router_kwargs.hidden=16 \\
    --config.adapter.gate=sharpened --config.adapter.gate_kwargs.sharpness=3
  python -m cuma_jax.main --workdir=runs/zonly --config.mode=eval
  python -c "import cuma_jax; print(cuma_jax.restore('runs/zonly').config.adapter)"

The config records ``adapter.plugins``, so evaluating and restoring import this module.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from cuma_jax.fields import field
from cuma_jax.layers.adapter import register_router
from cuma_jax.layers.routing import register_gate


@dataclasses.dataclass(frozen=True)
class SharpenedParams:
  # Power of the selected experts' probabilities before they are renormalised: 1 weights
  # them as they are, larger values give the most probable expert more.
  sharpness: float = field(2.0, low=1.0)


@register_gate("sharpened", params=SharpenedParams)
def sharpened(top_logits, top_probs, temperature, params):
  """Gates proportional to p_i ** sharpness over the k selected experts."""
  powered = top_probs**params.sharpness
  return powered / powered.sum(-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class ZOnlyParams:
  hidden: int = field(32, low=1)  # width of the router's hidden layer
  # Divides the logits: below 1 the router commits to its experts, above 1 it hedges.
  temperature: float = field(1.0, low=0.0, low_open=True)


@register_router("zonly", reads_demographics=True, params=ZOnlyParams)
class ZOnlyRouter(nn.Module):
  """logits [B, 1, N] = W2 relu(W1 z) / temperature: one decision per profile."""

  num_experts: int
  params: ZOnlyParams
  hidden_dims: tuple = ()  # the shared router_hidden and dropout keys are not read
  dropout: float = 0.0
  in_axis: str = ""
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, z, deterministic=True):
    h = nn.Dense(self.params.hidden, param_dtype=self.param_dtype, name="hidden")(z)
    logits = nn.Dense(self.num_experts, param_dtype=self.param_dtype, name="logits")(jax.nn.relu(h))
    return (logits / self.params.temperature)[:, None, :]
