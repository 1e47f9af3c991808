"""Every mixture strategy against a loop-free einsum oracle: outputs and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cuma_jax.layers.dispatch import (
  AUTO,
  DISPATCH,
  mixture,
  mixture_ragged,
  resolve_strategy,
)
from cuma_jax.layers.routing import select_experts
from cuma_jax.sharding import RULES_PRESETS, Layout, make_mesh

B, T, D_IN, D_OUT, RANK = 2, 5, 6, 7, 3
MASK = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)
# Tiny shapes: XLA:CPU compile time, not run time, dominates; skip its costly passes.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _oracle_delta(x, a, b, router_w, top_k):
  """Reference-mode routing as the released code writes it (scatter the top-k
  probabilities over a -inf floor, softmax again), then every expert, gated."""
  probs = jax.nn.softmax(x @ router_w, axis=-1)
  rank_of = jnp.argsort(jnp.argsort(-probs, axis=-1), axis=-1)
  floored = jnp.where(rank_of < top_k, probs, -jnp.inf)
  gates = jax.nn.softmax(floored, axis=-1)  # exactly 0 outside the top-k
  if a.ndim == 2:
    return jnp.einsum("btn,btd,dr,nro->bto", gates, x, a, b)
  return jnp.einsum("btn,btd,ndr,nro->bto", gates, x, a, b)


def _library_delta(x, a, b, router_w, top_k, strategy):
  return mixture(x, a, b, select_experts(x @ router_w, top_k, "softmax_top_probs"), strategy)


def _loss_and_grads(delta_fn, x, a, b, router_w, cotangent):
  def loss(x, a, b, router_w):
    return jnp.sum(MASK[..., None] * cotangent * delta_fn(x, a, b, router_w))

  out = delta_fn(x, a, b, router_w)
  return out, jax.grad(loss, argnums=(0, 1, 2, 3))(x, a, b, router_w)


def _inputs(num_experts, shared_a, seed=0):
  rng = np.random.default_rng(seed)
  a_shape = (D_IN, RANK) if shared_a else (num_experts, D_IN, RANK)
  shapes = [(B, T, D_IN), a_shape, (num_experts, RANK, D_OUT), (D_IN, num_experts), (B, T, D_OUT)]
  scales = [1.0, 0.5, 0.5, 1.0, 1.0]
  return tuple(
    jnp.asarray(rng.normal(size=s) * c, jnp.float32) for s, c in zip(shapes, scales, strict=True)
  )


def _jit(fn):
  return jax.jit(fn, compiler_options=FAST_COMPILE)


@pytest.mark.device
@pytest.mark.parametrize("shared_a", [True, False], ids=["shared_a", "expert_a"])
@pytest.mark.parametrize(
  "num_experts,top_k",
  [
    pytest.param(1, 1, marks=pytest.mark.slow),
    pytest.param(4, 1, marks=pytest.mark.slow),
    (4, 2),
    (6, 3),
  ],
)
def test_every_strategy_matches_einsum_oracle(num_experts, top_k, shared_a):
  x, a, b, router_w, cot = _inputs(num_experts, shared_a)
  fns = {"oracle": functools.partial(_oracle_delta, top_k=top_k)}
  for strategy in (*DISPATCH.names(), AUTO):
    fns[strategy] = functools.partial(_library_delta, top_k=top_k, strategy=strategy)

  @_jit  # one compilation for every strategy and the oracle
  def run(x, a, b, router_w, cot):
    return {name: _loss_and_grads(fn, x, a, b, router_w, cot) for name, fn in fns.items()}

  results = run(x, a, b, router_w, cot)
  want_out, want_grads = results.pop("oracle")
  for strategy, (out, grads) in results.items():
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5, err_msg=strategy)
    for name, got, want in zip(("x", "a", "b", "router"), grads, want_grads, strict=True):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{strategy}: d/d{name}")
  if top_k > 1:  # the router really receives gradient through the gates
    assert float(jnp.abs(want_grads[3]).max()) > 1e-3


@pytest.mark.parametrize("strategy", ["dense", "ragged"])
def test_scale_multiplies_the_delta(strategy):
  x, a, b, router_w, _ = _inputs(4, True)

  @_jit
  def run(x, a, b, router_w):
    routing = select_experts(x @ router_w, 2, "softmax_top_probs")
    return mixture(x, a, b, routing, strategy, scale=2.5), _oracle_delta(x, a, b, router_w, 2)

  got, want = run(x, a, b, router_w)
  np.testing.assert_allclose(got, 2.5 * want, rtol=1e-5, atol=1e-5)


def test_ragged_rows_are_independent():
  # Each batch row is sorted on its own: a row's result cannot depend on other rows.
  x, a, b, router_w, _ = _inputs(4, False, seed=1)

  @_jit
  def run(x):
    return mixture_ragged(x, a, b, select_experts(x @ router_w, 2, "softmax_top_probs"))

  np.testing.assert_allclose(run(x[:1]), run(x)[:1], atol=1e-6)


@pytest.mark.parametrize("strategy", ["dense", "ragged"])
def test_bfloat16_inputs_compute_in_bfloat16(strategy):
  x, a, b, router_w, _ = _inputs(4, True)

  @_jit
  def run(x):
    routing = select_experts(x @ router_w, 2, "softmax_top_probs")
    return mixture(x.astype(jnp.bfloat16), a, b, routing, strategy)

  out = run(x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    out.astype(jnp.float32), _oracle_delta(x, a, b, router_w, 2), rtol=5e-2, atol=5e-2
  )


SHAPES = dict(num_tokens=4096, rank=64, top_k=2)


def test_auto_is_dense_on_cpu_at_every_expert_count():
  for n in (8, 16, 32, 64):
    assert resolve_strategy("auto", backend="cpu", num_experts=n, **SHAPES) == "dense"


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_auto_on_accelerators_goes_ragged_only_when_dense_wastes_a_lot(backend):
  pick = functools.partial(resolve_strategy, "auto", backend=backend)
  assert pick(num_experts=8, **SHAPES) == "dense"  # paper setting: waste too small
  assert pick(num_experts=64, **SHAPES) == "ragged"
  assert pick(num_experts=64, **{**SHAPES, "num_tokens": 8}) == "dense"  # decode step


def test_explicit_strategies_pass_through_and_unknown_is_rejected():
  for strategy in ("dense", "ragged"):
    assert resolve_strategy(strategy, backend="cpu", num_experts=8, **SHAPES) == strategy
  with pytest.raises(ValueError, match=r"strategy.*dense.*ragged.*auto"):
    resolve_strategy("sparse", backend="cpu", num_experts=8, **SHAPES)
  x, a, b, router_w, _ = _inputs(4, True)
  with pytest.raises(ValueError, match="strategy"):
    mixture(x, a, b, select_experts(x @ router_w, 2), "sparse")


def _sharded_inputs(rows, seed=3):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(rows, T, D_IN)), jnp.float32)
  a = jnp.asarray(0.5 * rng.normal(size=(6, D_IN, RANK)), jnp.float32)
  b = jnp.asarray(0.5 * rng.normal(size=(6, RANK, D_OUT)), jnp.float32)
  router_w = jnp.asarray(rng.normal(size=(D_IN, 6)), jnp.float32)
  return x, a, b, router_w


def _ragged_loss(x, a, b, router_w):
  return jnp.sum(mixture_ragged(x, a, b, select_experts(x @ router_w, 2, "softmax_top_probs")) ** 2)


@pytest.mark.slow  # the oracle on one device is fast (above)
def test_ragged_on_a_mesh_sorts_each_devices_rows_and_matches_the_oracle():
  # Batch over data x fsdp (4 ways), model replicated: each device sorts its own rows.
  layout = Layout(make_mesh((("data", 2), ("fsdp", 2), ("model", 2))), RULES_PRESETS["fsdp_tp"])
  x, a, b, router_w = _sharded_inputs(rows=8)

  def oracle_loss(x, a, b, router_w):
    return jnp.sum(_oracle_delta(x, a, b, router_w, 2) ** 2)

  with layout.active():
    x_sharded = jax.device_put(x, layout.batch)
    got = _jit(jax.value_and_grad(_ragged_loss, argnums=(0, 1, 2, 3)))(x_sharded, a, b, router_w)
    hlo = jax.jit(_ragged_loss).lower(x_sharded, a, b, router_w).as_text()
  assert "shard_map" in hlo or "manual" in hlo  # the per-device path was taken
  want = jax.value_and_grad(oracle_loss, argnums=(0, 1, 2, 3))(x, a, b, router_w)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for name, g, w in zip(("x", "a", "b", "router"), got[1], want[1], strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.slow  # an ahead-of-time TPU compile
def test_ragged_compiles_for_a_tpu_topology():
  # Ahead of time through libtpu, without a TPU: a batched (vmapped) ragged dot did not
  # compile for TPU at all ("Failed to create RaggedConvSpec").
  from jax.experimental import topologies

  topology = topologies.get_topology_desc(topology_name="v5e:2x4", platform="tpu")
  mesh = make_mesh((("data", 8),), devices=topology.devices)
  layout = Layout(mesh, RULES_PRESETS["dp"])
  rows, tokens, d_in, d_out, experts, rank = 16, 256, 512, 512, 32, 16

  def shaped(shape, sharding=None):
    return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding or layout.replicated)

  def loss(x, a, b, router_w):
    routing = select_experts(x.astype(jnp.float32) @ router_w, 2, "softmax_top_probs")
    return jnp.sum(mixture_ragged(x, a, b, routing).astype(jnp.float32))

  with layout.active():
    compiled = (
      jax.jit(jax.grad(loss, argnums=(1, 2)))
      .lower(
        shaped((rows, tokens, d_in), layout.batch),
        shaped((experts, d_in, rank)),
        shaped((experts, rank, d_out)),
        jax.ShapeDtypeStruct((d_in, experts), jnp.float32, sharding=layout.replicated),
      )
      .compile()
    )
  assert "ragged" in compiled.as_text().lower()
