"""The optional trainable projection of the demographic vector before the routers.

See docs/method.md#demographic-encoder.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from cuma_jax import sharding as ax


class DemographicProjection(nn.Module):
  """Optional trainable map of the encoder's vector before the routers (1 or 2 layers).

  The final layer starts near zero (xavier-normal, gain 0.01; zero bias) so routing at
  initialisation is driven by the token, as in the released code.
  """

  features: tuple[int, ...]
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    z = z.astype(jnp.float32)
    for i, width in enumerate(self.features):
      last = i == len(self.features) - 1
      init = (
        nn.initializers.variance_scaling(0.01**2, "fan_avg", "normal")
        if last
        else nn.initializers.lecun_normal()
      )
      in_axis = ax.DEMO if i == 0 else ax.ROUTER_HIDDEN
      z = nn.Dense(
        width,
        dtype=jnp.float32,
        param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(init, (in_axis, ax.ROUTER_HIDDEN)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (ax.ROUTER_HIDDEN,)),
        name=f"dense_{i}",
      )(z)
      if not last:
        z = nn.relu(z)
    return z
