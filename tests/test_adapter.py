"""Router and LoraExperts modules against plain numpy MLP / LoRA built from their params."""

import itertools
import math

import chex
import flax.linen as nn
from helpers import randomise
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch

from cuma_jax.layers.adapter import LoraExperts, Router
from cuma_jax.layers.routing import select_experts
from cuma_jax.sharding import DEMO, EMBED, EXPERTS, HEADS, LORA_RANK, ROUTER_HIDDEN

B, T, D_IN, D_DEMO, D_OUT = 2, 4, 6, 5, 7
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(B, T, D_IN)), jnp.float32)
Z = jnp.asarray(RNG.normal(size=(B, D_DEMO)), jnp.float32)


def _params(variables):
  return jax.tree.map(np.asarray, nn.unbox(variables)["params"])


def _init(module, *args):
  """Jitted init: eager Flax init compiles op by op, which dominates these tiny tests."""
  return jax.jit(module.init)(jax.random.PRNGKey(0), *args)


def _shapes(module, *args):
  """Parameter boxes (logical names) and shapes without compiling anything."""
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)["params"]


def _naive_router(p, x, z, hidden_dims):
  """The released code's router literally: concat(x, z) per token through one MLP."""
  u = x if z is None else np.concatenate([x, np.broadcast_to(z[:, None], (B, T, D_DEMO))], -1)
  w1 = p["in_x"] if z is None else np.concatenate([p["in_x"], p["in_z"]], 0)
  h = u @ w1 + p["in_bias"]
  for i in range(1, len(hidden_dims) + 1):
    h = np.maximum(h, 0.0) @ p[f"layer{i}_w"] + p[f"layer{i}_bias"]
  return h


@pytest.mark.parametrize(
  "hidden_dims,use_demographics", [((), True), ((8,), True), ((8, 3), False)]
)
def test_router_z_split_equals_concat_mlp(hidden_dims, use_demographics):
  router = Router(num_experts=4, hidden_dims=hidden_dims, use_demographics=use_demographics)
  x_bf16 = X.astype(jnp.bfloat16)

  @jax.jit
  def run(key):
    variables = router.init(key, X, Z)
    return variables, router.apply(variables, x_bf16, Z)

  variables, logits = run(jax.random.PRNGKey(0))
  assert logits.dtype == jnp.float32 and logits.shape == (B, T, 4)
  z = np.asarray(Z) if use_demographics else None
  want = _naive_router(_params(variables), np.asarray(x_bf16, np.float32), z, hidden_dims)
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden_dims", [(), (8,), (8, 3)])
def test_router_parameter_count_equals_one_concat_matrix(hidden_dims):
  params = nn.unbox(_shapes(Router(num_experts=4, hidden_dims=hidden_dims), X, Z))
  widths = [D_IN + D_DEMO, *hidden_dims, 4]
  expected = sum(i * o + o for i, o in itertools.pairwise(widths))
  assert sum(np.prod(v.shape) for v in jax.tree.leaves(params)) == expected


def test_router_init_is_torch_linear_default_over_full_fan_in():
  p = _params(_init(Router(num_experts=4, hidden_dims=(64,)), X, Z))
  bound = 1.0 / np.sqrt(D_IN + D_DEMO)
  for name in ("in_x", "in_z", "in_bias"):
    assert np.abs(p[name]).max() <= bound and np.abs(p[name]).max() > 0.5 * bound
  assert np.abs(p["layer1_w"]).max() <= 1.0 / np.sqrt(64)


def test_router_logical_axes():
  params = _shapes(Router(num_experts=4, hidden_dims=(8, 3), in_axis=EMBED), X, Z)
  assert {k: v.names for k, v in params.items()} == {
    "in_x": (EMBED, ROUTER_HIDDEN),
    "in_z": (DEMO, ROUTER_HIDDEN),
    "in_bias": (ROUTER_HIDDEN,),
    "layer1_w": (ROUTER_HIDDEN, ROUTER_HIDDEN),
    "layer1_bias": (ROUTER_HIDDEN,),
    "layer2_w": (ROUTER_HIDDEN, EXPERTS),
    "layer2_bias": (EXPERTS,),
  }


def test_router_dropout_masks_z_per_token():
  router = Router(num_experts=4, hidden_dims=(), dropout=0.5)
  zero_x = jnp.zeros_like(X)  # logits then depend on z (and its dropout mask) only

  @jax.jit
  def run(key):
    variables = router.init(key, X, Z)
    train = router.apply(variables, zero_x, Z, deterministic=False, rngs={"dropout": key})
    return router.apply(variables, zero_x, Z), train

  eval_logits, train_logits = run(jax.random.PRNGKey(0))
  np.testing.assert_allclose(eval_logits[:, 0], eval_logits[:, 1], atol=1e-6)
  assert not np.allclose(train_logits[:, 0], train_logits[:, 1])


def _lora_experts(num_experts, shared_a, strategy="dense", **kw):
  fields = dict(features=D_OUT, rank=3, alpha=6.0, in_axis=EMBED, out_axis=HEADS)
  return LoraExperts(
    num_experts=num_experts, shared_a=shared_a, strategy=strategy, **{**fields, **kw}
  )


@pytest.mark.parametrize("shared_a", [True, False])
def test_one_expert_equals_plain_lora(shared_a):
  routing = select_experts(jnp.zeros((B, T, 1)), 1, "softmax_top_probs")
  modules = {s: _lora_experts(1, shared_a, s) for s in ("dense", "ragged", "auto")}
  variables = randomise(nn.unbox(_shapes(modules["dense"], X, routing)), 1)
  deltas = jax.jit(lambda v: {s: m.apply(v, X, routing) for s, m in modules.items()})(
    {"params": variables}
  )
  a, b = variables["a"], variables["b"]
  a = np.asarray(a if shared_a else a[0])
  want = np.asarray(X) @ a @ np.asarray(b[0]) * (6.0 / 3)
  for strategy, delta in deltas.items():
    np.testing.assert_allclose(delta, want, rtol=1e-5, atol=1e-5, err_msg=strategy)


def test_lora_experts_applies_alpha_over_rank_to_gated_experts():
  logits = jnp.asarray(RNG.normal(size=(B, T, 4)), jnp.float32)
  routing = select_experts(logits, 2, "softmax_top_logits")
  module = _lora_experts(4, False)
  variables = {"params": randomise(nn.unbox(_shapes(module, X, routing)), 2)}
  a, b = (np.asarray(variables["params"][k]) for k in ("a", "b"))
  gates = np.zeros((B, T, 4))
  np.put_along_axis(gates, np.asarray(routing.experts), np.asarray(routing.gates), -1)
  want = 2.0 * np.einsum("btn,btd,ndr,nro->bto", gates, np.asarray(X), a, b)
  delta = jax.jit(module.apply)(variables, X, routing)
  np.testing.assert_allclose(delta, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared_a", [True, False])
def test_lora_experts_init_and_axes(shared_a):
  routing = select_experts(jnp.zeros((B, T, 4)), 2)
  module = _lora_experts(4, shared_a)
  variables = _init(module, X, routing)
  a, b = variables["params"]["a"], variables["params"]["b"]
  if shared_a:
    assert a.value.shape == (D_IN, 3) and a.names == (EMBED, LORA_RANK)
  else:
    assert a.value.shape == (4, D_IN, 3) and a.names == (EXPERTS, EMBED, LORA_RANK)
  assert b.value.shape == (4, 3, D_OUT) and b.names == (EXPERTS, LORA_RANK, HEADS)
  assert not np.any(b.value) and 0.003 < float(jnp.std(a.value)) < 0.03
  np.testing.assert_array_equal(jax.jit(module.apply)(variables, X, routing), 0.0)


@pytest.mark.parametrize("a_init", ["normal", "kaiming_uniform"])
def test_lora_experts_a_init_law(a_init):
  # A's 8 * 512 * 16 entries against the law each name promises; the uniform's bound is
  # torch's kaiming_uniform_(a=sqrt(5)) on a [r, d_in] weight (PEFT's LoRA A), from torch.
  d_in = 512
  x = jnp.zeros((1, 2, d_in))
  routing = select_experts(jnp.zeros((1, 2, 8)), 2)
  module = LoraExperts(features=4, num_experts=8, rank=16, alpha=32.0, a_init=a_init)
  a = np.asarray(nn.unbox(_init(module, x, routing))["params"]["a"]).ravel()
  if a_init == "normal":
    law = scipy.stats.norm(0.0, 0.01)
  else:
    gain = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    bound = gain * math.sqrt(3.0 / d_in)
    law = scipy.stats.uniform(-bound, 2 * bound)
    assert np.abs(a).max() <= bound
  assert scipy.stats.kstest(a, law.cdf).pvalue > 1e-3
  with pytest.raises(ValueError, match=r"a_init='xavier'.*'kaiming_uniform'"):
    LoraExperts(features=4, num_experts=8, rank=16, alpha=32.0, a_init="xavier")


def test_lora_experts_dtype_and_dropout():
  routing = select_experts(jnp.zeros((B, T, 4)), 2)
  module = _lora_experts(4, True, dtype=jnp.bfloat16, dropout=0.5)
  variables = {"params": randomise(nn.unbox(_shapes(module, X, routing)), 3)}

  @jax.jit
  def run(key):
    train = module.apply(variables, X, routing, deterministic=False, rngs={"dropout": key})
    return module.apply(variables, X, routing), train

  eval_out, train_out = run(jax.random.PRNGKey(1))
  assert eval_out.dtype == jnp.bfloat16
  assert not np.allclose(np.asarray(train_out, np.float32), np.asarray(eval_out, np.float32))


@pytest.mark.parametrize(
  "make,field",
  [
    (lambda: _lora_experts(4, True, rank=0), "rank"),
    (lambda: LoraExperts(features=4, num_experts=0, rank=2, alpha=4.0), "num_experts"),
    (lambda: LoraExperts(features=0, num_experts=2, rank=2, alpha=4.0), "features"),
    (lambda: _lora_experts(4, True, strategy="sparse"), r"strategy.*dense.*ragged.*auto"),
    (lambda: _lora_experts(4, True, dropout=1.0), "dropout"),
    (lambda: Router(num_experts=0), "num_experts"),
    (lambda: Router(num_experts=4, hidden_dims=(0,)), "hidden_dims"),
    (lambda: Router(num_experts=4, dropout=-0.1), "dropout"),
  ],
)
def test_validation_names_the_field(make, field):
  with pytest.raises(ValueError, match=field):
    make()


def test_call_time_validation():
  with pytest.raises(ValueError, match="z"):
    Router(num_experts=4).init(jax.random.PRNGKey(0), X, None)
  routing = select_experts(jnp.zeros((B, T, 3)), 2)
  with pytest.raises(ValueError, match="num_experts"):
    _lora_experts(4, True).init(jax.random.PRNGKey(0), X, routing)


def _group_oracle(params, x, z, adapter, outputs, router_of):
  """Section 2 written out: router MLP on concat(x, z), reference top-k gates, every
  expert's alpha/r * B_i A_i x as one einsum; nothing from cuma_jax.layers."""
  deltas, k, n = {}, adapter.top_k, adapter.num_experts
  for t in outputs:
    p = params[f"{router_of(t)}_router"]
    u = jnp.concatenate([x, jnp.broadcast_to(z[:, None], (*x.shape[:2], z.shape[-1]))], -1)
    h = jax.nn.relu(u @ jnp.concatenate([p["in_x"], p["in_z"]], 0) + p["in_bias"])
    probs = jax.nn.softmax(h @ p["layer1_w"] + p["layer1_bias"], -1)
    chosen = jnp.argsort(-probs, axis=-1)[..., :k]
    gates = jax.nn.softmax(jnp.take_along_axis(probs, chosen, -1), -1)
    dense = jnp.sum(gates[..., None] * jax.nn.one_hot(chosen, n), -2)
    a, b = params[f"{t}_lora"]["a"], params[f"{t}_lora"]["b"]
    a = jnp.broadcast_to(a, (n, *a.shape)) if a.ndim == 2 else a
    deltas[t] = adapter.alpha / adapter.rank * jnp.einsum("btn,btd,ndr,nro->bto", dense, x, a, b)
  return deltas


@pytest.mark.device
@pytest.mark.parametrize("strategy", ["dense", "ragged"])
@pytest.mark.parametrize(
  "shared_a,share_router",
  [
    pytest.param(True, True, marks=pytest.mark.slow),
    (False, False),
    pytest.param(False, True, marks=pytest.mark.slow),
  ],
)
def test_adapter_group_matches_oracle(strategy, shared_a, share_router):
  """The decoder's adapter block for q/k/v (one router or one each, shared or per-expert
  A) against the written-out formula: outputs and every gradient."""
  from cuma_jax.layers.adapter_config import AdapterConfig
  from cuma_jax.layers.group import AdapterGroup

  adapter = AdapterConfig(
    targets=("q_proj", "k_proj", "v_proj"),
    rank=3,
    alpha=6.0,
    num_experts=4,
    top_k=2,
    shared_a=shared_a,
    router_hidden=(8,),
    demographic_dim=D_DEMO,
    share_router=share_router,
    strategy=strategy,
  )
  group = AdapterGroup(adapter=adapter, group="attn_in", dtype=jnp.float32, deterministic=True)
  outputs = {"q_proj": (D_OUT, HEADS), "k_proj": (2, HEADS), "v_proj": (3, HEADS)}
  shapes = jax.eval_shape(
    lambda key: group.init(key, X, Z, None, outputs, EMBED), jax.random.PRNGKey(0)
  )["params"]
  params = randomise(nn.unbox(shapes), 4)
  router_of = (lambda t: "attn_in") if share_router else (lambda t: t)
  cot = {t: jnp.asarray(RNG.normal(size=(B, T, d)), jnp.float32) for t, (d, _) in outputs.items()}

  def loss(fn):
    return lambda p, x: sum(jnp.sum(fn(p, x)[t] * cot[t]) for t in outputs)

  group_fn = lambda p, x: group.apply({"params": p}, x, Z, None, outputs, EMBED)[0]
  oracle_fn = lambda p, x: _group_oracle(p, x, Z, adapter, outputs, router_of)
  got = jax.jit(lambda p, x: (group_fn(p, x), jax.grad(loss(group_fn), (0, 1))(p, x)))(params, X)
  want = (oracle_fn(params, X), jax.grad(loss(oracle_fn), (0, 1))(params, X))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
