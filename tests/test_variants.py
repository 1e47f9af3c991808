"""The shipped research variants against numpy: the demographic-only router inside the
decoder's adapter group (every token of a profile takes the same experts), run with and
without jit (``chex.variants``)."""

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import numpy as np

from cuma_jax.layers.adapter_config import AdapterConfig
from cuma_jax.layers.group import AdapterGroup
from cuma_jax.sharding import EMBED

B, T, D_IN, D_DEMO, D_OUT, N, K, H = 3, 5, 6, 4, 7, 5, 2, 8
RNG = np.random.default_rng(0)
X = RNG.normal(size=(B, T, D_IN)).astype(np.float32)
Z = RNG.normal(size=(B, D_DEMO)).astype(np.float32)
MASK = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.float32)


def _numpy_demographic_routing(p, z, gate, temperature):
  h = np.maximum(z @ p["layer0"]["kernel"] + p["layer0"]["bias"], 0.0)
  logits = h @ p["layer1"]["kernel"] + p["layer1"]["bias"]  # [B, N]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  experts = np.argsort(-probs, -1, kind="stable")[:, :K]
  top_p = np.take_along_axis(probs, experts, -1)
  top_l = np.take_along_axis(logits, experts, -1)
  raw = {"softmax_top_probs": top_p, "tempered_softmax_top_logits": top_l / temperature}[gate]
  gates = np.exp(raw) / np.exp(raw).sum(-1, keepdims=True)
  return experts, gates


class DemographicRouterTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(("softmax_top_probs", 1.0), ("tempered_softmax_top_logits", 0.3))
  def test_routing_is_the_numpy_mlp_of_z_for_every_token(self, gate, temperature):
    adapter = AdapterConfig(
      targets=("q_proj",),
      rank=2,
      alpha=4.0,
      num_experts=N,
      top_k=K,
      router="demographics",
      router_hidden=(H,),
      demographic_dim=D_DEMO,
      gate=gate,
      gate_temperature=temperature,
    )
    group = AdapterGroup(
      adapter=adapter,
      group="attn_in",
      dtype=np.float32,
      deterministic=True,
      capture_routing=True,
    )
    outputs = {"q_proj": (D_OUT, EMBED)}
    variables = group.init(jax.random.PRNGKey(0), X, Z, MASK, outputs, EMBED)
    params = nn.unbox(variables)["params"]

    @self.variant
    def route(params, x, z, mask):
      return group.apply({"params": params}, x, z, mask, outputs, EMBED)[1]

    aux = route(params, X, Z, MASK)
    router = jax.tree.map(np.asarray, params["q_proj_router"])
    experts, gates = _numpy_demographic_routing(router, Z, gate, temperature)
    decision = aux["routing"]["q_proj"]
    chex.assert_shape(decision["experts"], (B, T, K))
    np.testing.assert_array_equal(decision["experts"], np.broadcast_to(experts[:, None], (B, T, K)))
    np.testing.assert_allclose(
      decision["gates"], np.broadcast_to(gates[:, None], (B, T, K)), rtol=1e-5
    )
    # Counts: each real token adds one assignment to each of its profile's K experts.
    expected = np.zeros(N)
    for b in range(B):
      np.add.at(expected, experts[b], MASK[b].sum())
    np.testing.assert_array_equal(aux["expert_counts"]["q_proj"], expected)

  def test_the_router_has_no_token_weights(self):
    adapter = AdapterConfig(
      targets=("q_proj",),
      num_experts=N,
      top_k=K,
      router="demographics",
      router_hidden=(H,),
      demographic_dim=D_DEMO,
    )
    group = AdapterGroup(adapter=adapter, group="attn_in", dtype=np.float32, deterministic=True)
    outputs = {"q_proj": (D_OUT, EMBED)}
    shapes = jax.eval_shape(
      lambda key: group.init(key, X, Z, MASK, outputs, EMBED), jax.random.PRNGKey(0)
    )["params"]["q_proj_router"]
    chex.assert_trees_all_equal_shapes(
      nn.unbox(shapes),
      {
        "layer0": {"kernel": np.zeros((D_DEMO, H)), "bias": np.zeros(H)},
        "layer1": {"kernel": np.zeros((H, N)), "bias": np.zeros(N)},
      },
    )
