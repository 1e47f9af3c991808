"""The optimiser: learning-rate schedules against their formulas written out, and AdamW
(weight decay on matrices only, clipping, accumulation) against ``torch.optim.AdamW``."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from cuma_jax.training import optim

PEAK, WARMUP, TOTAL = 0.1, 4, 20


def _optim(**overrides):
  return ml_collections.ConfigDict(
    dict(
      learning_rate=PEAK,
      warmup_steps=WARMUP,
      schedule="cosine",
      horizon_steps=0,
      b1=0.9,
      b2=0.999,
      weight_decay=0.1,
      grad_clip=0.0,
      accumulation_steps=1,
    )
    | overrides
  )


def _expected_rate(schedule, step, horizon=TOTAL):
  if step < WARMUP:
    return PEAK * step / WARMUP
  t, decay = step - WARMUP, horizon - WARMUP
  if schedule == "constant":
    return PEAK
  if schedule == "linear":
    return PEAK * max(1 - t / decay, 0.0)
  return PEAK * 0.5 * (1 + math.cos(math.pi * min(t, decay) / decay))


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedules_warm_up_linearly_then_follow_their_formula(schedule):
  rate = optim.learning_rate_schedule(_optim(schedule=schedule), TOTAL)
  for step in range(TOTAL + 1):
    assert float(rate(step)) == pytest.approx(_expected_rate(schedule, step), abs=1e-7), step


def test_horizon_steps_stretch_the_decay_past_the_run():
  rate = optim.learning_rate_schedule(_optim(schedule="linear", horizon_steps=40), TOTAL)
  assert float(rate(TOTAL)) == pytest.approx(_expected_rate("linear", TOTAL, horizon=40))
  assert float(rate(TOTAL)) > 0.0


def test_an_unknown_schedule_is_refused_naming_the_allowed():
  with pytest.raises(ValueError, match="optim.schedule='step'; allowed: constant, linear, cosine"):
    optim.learning_rate_schedule(_optim(schedule="step"), TOTAL)


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "w": rng.normal(size=(3, 4)).astype(np.float32),
    "b": rng.normal(size=4).astype(np.float32),
  }


def _torch_steps(params, grads, config, steps):
  """torch.optim.AdamW with decay on the matrix only, clipping as configured."""
  w, b = (torch.tensor(params[k], requires_grad=True) for k in ("w", "b"))
  rate = optim.learning_rate_schedule(config, steps)
  opt = torch.optim.AdamW(
    [{"params": [w], "weight_decay": config.weight_decay}, {"params": [b], "weight_decay": 0.0}],
    lr=0.0,
    betas=(config.b1, config.b2),
    eps=1e-8,
  )
  for step, g in enumerate(grads):
    for group in opt.param_groups:
      group["lr"] = float(rate(step))
    w.grad, b.grad = torch.tensor(g["w"]), torch.tensor(g["b"])
    if config.grad_clip:
      torch.nn.utils.clip_grad_norm_([w, b], config.grad_clip)
    opt.step()
  return {"w": w.detach().numpy(), "b": b.detach().numpy()}


def _our_steps(params, grads, config, steps):
  tx = optim.make_optimizer(config, steps)
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  return jax.tree.map(np.asarray, params)


@pytest.mark.parametrize("grad_clip", [0.0, 0.5])
def test_adamw_equals_torch_with_decay_on_matrices_only(grad_clip):
  config = _optim(grad_clip=grad_clip, warmup_steps=1)
  grads = [_params(seed) for seed in (1, 2, 3)]
  ours = _our_steps(_params(), grads, config, 3)
  expected = _torch_steps(_params(), grads, config, 3)
  for name in ("w", "b"):
    np.testing.assert_allclose(ours[name], expected[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_accumulated_updates_are_one_step_on_the_mean_gradient():
  config = _optim(warmup_steps=0, schedule="constant")
  grads = [_params(seed) for seed in (1, 2)]
  tx = optim.make_optimizer(_optim(warmup_steps=0, schedule="constant", accumulation_steps=2), 1)
  params = jax.tree.map(jnp.asarray, _params())
  state = tx.init(params)
  updates, state = tx.update(jax.tree.map(jnp.asarray, grads[0]), state, params)
  assert all(not np.any(u) for u in jax.tree.leaves(updates))  # nothing until the second
  params = jax.tree.map(lambda p, u: p + u, params, updates)
  updates, state = tx.update(jax.tree.map(jnp.asarray, grads[1]), state, params)
  params = jax.tree.map(lambda p, u: p + u, params, updates)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  expected = _torch_steps(_params(), [mean], config, 1)
  for name in ("w", "b"):
    np.testing.assert_allclose(params[name], expected[name], rtol=1e-5, atol=1e-5, err_msg=name)
