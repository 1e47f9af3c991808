"""Gate semantics, dense gates, balance loss and counts against numpy oracles."""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cuma_jax.layers import routing as R
from cuma_jax.layers.routing import Routing, check_routing_config

# The gates whose maths this file checks against numpy (variants have their own tests).
GATES = ("softmax_top_probs", "softmax_top_logits", "top_probs")

# Jitted once per configuration: op-by-op dispatch would dominate the test time.
select_experts = jax.jit(R.select_experts, static_argnums=(1, 2, 3))
balance_loss = jax.jit(R.balance_loss, static_argnums=(2, 3, 4))
dense_gates = jax.jit(R.dense_gates, static_argnums=1)
expert_counts = jax.jit(R.expert_counts, static_argnums=2)


def _normal(seed, shape):
  return np.random.default_rng(seed).normal(size=shape)


LOGITS = [2.0, 1.0, 0.5, -1.0]
# softmax(LOGITS) = exp(l) / sum(exp(l)), worked out with numpy.
PROBS = [0.60946004, 0.22420782, 0.13598892, 0.03034323]
EXPECTED_GATES = {
  # second softmax over the top-2 probabilities: exp(p_i) / (exp(p_0) + exp(p_1))
  "softmax_top_probs": [0.59513925, 0.40486075],
  # softmax over the top-2 logits: exp(2) / (exp(2) + exp(1)) = 1 / (1 + e^-1)
  "softmax_top_logits": [0.73105858, 0.26894142],
  # raw probabilities, no renormalisation
  "top_probs": [0.60946004, 0.22420782],
}


@pytest.mark.parametrize("gate", GATES)
def test_gate_semantics_hand_example(gate):
  l = np.array(LOGITS)
  p = np.exp(l) / np.exp(l).sum()
  np.testing.assert_allclose(p, PROBS, atol=1e-7)
  oracle = {
    "softmax_top_probs": np.exp(p[:2]) / np.exp(p[:2]).sum(),
    "softmax_top_logits": np.exp(l[:2]) / np.exp(l[:2]).sum(),
    "top_probs": p[:2],
  }[gate]
  np.testing.assert_allclose(oracle, EXPECTED_GATES[gate], atol=1e-7)

  routing = select_experts(jnp.array(LOGITS), 2, gate)
  assert routing.gates.dtype == jnp.float32 and routing.experts.dtype == jnp.int32
  np.testing.assert_array_equal(routing.experts, [0, 1])
  np.testing.assert_allclose(routing.gates, EXPECTED_GATES[gate], atol=1e-6)
  np.testing.assert_allclose(routing.probs, PROBS, atol=1e-6)
  np.testing.assert_allclose(dense_gates(routing, 4), EXPECTED_GATES[gate] + [0.0, 0.0], atol=1e-6)


def test_released_code_gate_range_for_k2():
  # The larger reference gate for k=2 can only lie in [0.5, 1/(1+e^-1)] = [0.5, 0.731].
  logits = jnp.asarray(_normal(0, (512, 8)) * 5.0, jnp.float32)
  top = select_experts(logits, 2, "softmax_top_probs").gates[:, 0]
  assert float(top.min()) >= 0.5 and float(top.max()) <= 0.7310586 + 1e-6


def test_bf16_logits_give_float32_routing():
  routing = select_experts(jnp.array([LOGITS], jnp.bfloat16), 2, "softmax_top_logits")
  assert routing.gates.dtype == jnp.float32 and routing.probs.dtype == jnp.float32


def _numpy_routing(logits, k, gate):
  """Independent numpy routing: argsort ranking and explicit dense scatter."""
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  idx = np.argsort(-p, axis=-1, kind="stable")[..., :k]
  top_p = np.take_along_axis(p, idx, -1)
  top_l = np.take_along_axis(logits, idx, -1)
  if gate == "softmax_top_probs":
    g = np.exp(top_p) / np.exp(top_p).sum(-1, keepdims=True)
  elif gate == "softmax_top_logits":
    g = np.exp(top_l - top_l.max(-1, keepdims=True))
    g /= g.sum(-1, keepdims=True)
  else:
    g = top_p
  dense = np.zeros_like(p)
  np.put_along_axis(dense, idx, g, -1)
  return p, idx, dense


def _numpy_balance_loss(logits, mask, k, gate):
  """docs/method.md#balance-loss literally, in numpy float64."""
  n = logits.shape[-1]
  p, _, g = _numpy_routing(logits, k, gate)
  m = mask.astype(np.float64)[..., None]
  t = m.sum()
  if gate == "top_probs":  # released code: full softmax weights, sign() == 1 everywhere
    f = np.full(n, 1.0 / k)
    prop = (m * p).reshape(-1, n).sum(0) / t
  else:
    f = (m * (g > 0)).reshape(-1, n).sum(0) / (t * k)
    prop = (m * g).reshape(-1, n).sum(0) / t
  return n * np.sum(prop * f), f


MASK = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])


class BalanceLossTest(chex.TestCase):
  """Routing and the balance loss against numpy, traced under jit and run op by op."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(gate=GATES, nk=[(1, 1), (6, 3)])
  def test_balance_loss_matches_numpy_with_padding(self, gate, nk):
    n, k = nk
    logits = _normal(n + k, (3, 6, n)) * 2.0
    select = self.variant(R.select_experts, static_argnums=(1, 2))
    loss_fn = self.variant(R.balance_loss, static_argnums=(2, 3, 4))
    routing = select(jnp.asarray(logits, jnp.float32), k, gate)
    p, idx, dense = _numpy_routing(logits, k, gate)
    np.testing.assert_array_equal(routing.experts, idx)
    np.testing.assert_allclose(routing.probs, p, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(R.dense_gates(routing, n), dense, rtol=1e-5, atol=1e-7)
    loss = loss_fn(routing, jnp.asarray(MASK), n, k, gate)
    expected, _ = _numpy_balance_loss(logits, MASK, k, gate)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6)
    if gate == "top_probs":
      np.testing.assert_allclose(float(loss), n / k, rtol=1e-6)


def test_balance_loss_ignores_padded_tokens():
  logits = _normal(7, (3, 6, 4))
  garbage = logits.copy()
  garbage[MASK == 0] = 100.0 * np.arange(4)
  losses = [
    balance_loss(
      select_experts(jnp.asarray(l), 2, "softmax_top_probs"), MASK, 4, 2, "softmax_top_probs"
    )
    for l in (logits, garbage)
  ]
  np.testing.assert_allclose(float(losses[0]), float(losses[1]), rtol=1e-6)


@pytest.mark.parametrize("gate", GATES)
def test_balance_loss_no_tokens_is_zero_not_nan(gate):
  routing = select_experts(jnp.ones((2, 3, 4)), 2, gate)
  loss = balance_loss(routing, jnp.zeros((2, 3)), 4, 2, gate)
  assert float(loss) == 0.0


@pytest.mark.parametrize("gate", ["softmax_top_probs", "softmax_top_logits"])
def test_balance_loss_gradient_flows_only_through_gate_mass(gate):
  # dL/dg_{t,s} = N * f_{e(t,s)} * m_t / T: f acts as a constant (no gradient of its own).
  n, k = 5, 2
  logits = _normal(3, (3, 6, n))
  routing = select_experts(jnp.asarray(logits), k, gate)
  loss = lambda g: balance_loss(routing._replace(gates=g), MASK, n, k, gate)
  grad = jax.jit(jax.grad(loss))(routing.gates)
  _, f = _numpy_balance_loss(logits, MASK, k, gate)
  expected = n * f[np.asarray(routing.experts)] * MASK[..., None] / MASK.sum()
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_soft_balance_loss_has_no_gradient():
  logits = jnp.asarray(_normal(4, (2, 6, 4)), jnp.float32)
  loss = lambda l: balance_loss(select_experts(l, 2, "top_probs"), MASK[:2], 4, 2, "top_probs")
  grad = jax.jit(jax.grad(loss))(logits)
  np.testing.assert_allclose(grad, 0.0, atol=1e-6)


def test_expert_counts_match_numpy():
  logits = _normal(5, (3, 6, 5))
  routing = select_experts(jnp.asarray(logits), 2, "softmax_top_logits")
  _, idx, _ = _numpy_routing(logits, 2, "softmax_top_logits")
  expected = np.zeros(5)
  np.add.at(expected, idx[MASK == 1].reshape(-1), 1.0)
  counts = expert_counts(routing, MASK, 5)
  assert counts.dtype == jnp.float32
  np.testing.assert_array_equal(counts, expected)
  np.testing.assert_array_equal(expert_counts(routing, None, 5).sum(), 3 * 6 * 2)


def test_routing_is_a_pytree_under_jit():
  routing = jax.jit(lambda l: select_experts(l, 2, "softmax_top_probs"))(jnp.array([LOGITS]))
  assert isinstance(routing, Routing)
  np.testing.assert_allclose(routing.gates[0], EXPECTED_GATES["softmax_top_probs"], atol=1e-6)


@pytest.mark.parametrize(
  "kwargs,field",
  [
    (dict(num_experts=0, top_k=1, gate="softmax_top_probs"), "num_experts"),
    (dict(num_experts=4, top_k=0, gate="softmax_top_probs"), "top_k"),
    (dict(num_experts=4, top_k=5, gate="softmax_top_probs"), "top_k"),
    (dict(num_experts=4, top_k=2, gate="hard"), "gate"),
  ],
)
def test_config_validation_names_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    check_routing_config(**kwargs)


def test_invalid_arguments_raise_from_public_functions():
  with pytest.raises(ValueError, match="top_k"):
    select_experts(jnp.zeros((2, 4)), 5, "softmax_top_probs")
  with pytest.raises(
    ValueError, match=r"adapter.gate.*softmax_top_probs.*softmax_top_logits.*top_probs"
  ):
    select_experts(jnp.zeros((2, 4)), 2, "topk")
  with pytest.raises(ValueError, match="gate"):
    balance_loss(select_experts(jnp.zeros((2, 4)), 2), None, 4, 2, "nope")


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_tempered_gate_hand_example(temperature):
  # softmax(top-k logits / tau) over the top-2 logits (2, 1), written out.
  top = np.array(LOGITS[:2]) / temperature
  expected = np.exp(top) / np.exp(top).sum()
  routing = select_experts(jnp.array(LOGITS), 2, "tempered_softmax_top_logits", temperature)
  np.testing.assert_array_equal(routing.experts, [0, 1])
  np.testing.assert_allclose(routing.gates, expected, atol=1e-6)
  if temperature == 1.0:  # tau = 1 is the paper's gate
    np.testing.assert_allclose(routing.gates, EXPECTED_GATES["softmax_top_logits"], atol=1e-6)
