"""DPO and GRPO objectives against numpy implementations of their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cuma_jax.training import preference

RNG = np.random.default_rng(0)


def _log_sigmoid(x):
  return -np.log1p(np.exp(-x))


def test_dpo_loss_and_gradients_equal_numpy():
  beta = 0.1
  pc, pr, rc, rr = (RNG.normal(size=6) * 5 for _ in range(4))
  margin = beta * ((pc - pr) - (rc - rr))
  expected = -np.mean(_log_sigmoid(margin))
  loss, metrics = preference.dpo_loss(*(jnp.asarray(a) for a in (pc, pr, rc, rr)), beta=beta)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["reward_margin"], margin.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["reward_accuracy"], (margin > 0).mean())
  # d loss / d pi_c = -beta sigmoid(-margin) / n, and the opposite for pi_r.
  grad_c, grad_r = jax.grad(lambda c, r: preference.dpo_loss(c, r, rc, rr, beta)[0], (0, 1))(
    jnp.asarray(pc), jnp.asarray(pr)
  )
  sig = 1.0 / (1.0 + np.exp(margin))
  np.testing.assert_allclose(grad_c, -beta * sig / 6, rtol=1e-5)
  np.testing.assert_allclose(grad_r, beta * sig / 6, rtol=1e-5)


def test_group_advantages_equal_numpy():
  rewards = np.array([1.0, 0.0, 0.5, 1.0, 0.2, 0.2, 0.2, 0.2])
  got = preference.group_advantages(jnp.asarray(rewards), 4)
  groups = rewards.reshape(2, 4)
  expected = (groups - groups.mean(1, keepdims=True)) / (
    groups.std(1, ddof=1, keepdims=True) + 1e-4
  )
  np.testing.assert_allclose(got, expected.reshape(-1), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[4:], 0.0)  # all alike: no signal
  with pytest.raises(ValueError, match=r"groups \* 3"):
    preference.group_advantages(jnp.asarray(rewards), 3)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
@pytest.mark.parametrize("kl_beta", [0.0, 0.04])
def test_grpo_loss_equals_numpy(loss_type, kl_beta):
  rng = np.random.default_rng(1)
  b, t = 3, 5
  lp = rng.normal(size=(b, t)) * 0.3 - 1
  old = lp + rng.normal(size=(b, t)) * 0.4  # ratios both inside and outside the clip range
  ref = lp + rng.normal(size=(b, t)) * 0.2
  adv = np.array([1.5, -0.7, 0.2])
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]], float)
  ratio = np.exp(lp - old)
  per = -np.minimum(ratio * adv[:, None], np.clip(ratio, 0.8, 1.2) * adv[:, None])
  per = per + kl_beta * (np.exp(ref - lp) - (ref - lp) - 1)
  if loss_type == "dapo":
    expected = (per * mask).sum() / mask.sum()
  else:
    expected = np.mean((per * mask).sum(1) / mask.sum(1))
  got = preference.grpo_loss(
    jnp.asarray(lp),
    jnp.asarray(old),
    jnp.asarray(adv),
    jnp.asarray(mask),
    loss_type=loss_type,
    ref_log_probs=jnp.asarray(ref),
    kl_beta=kl_beta,
  )
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  assert np.any(np.abs(ratio - 1) > 0.2)  # the clip is exercised


def test_grpo_loss_refuses_bad_arguments():
  x = jnp.zeros((1, 2))
  with pytest.raises(ValueError, match="loss_type='ppo'"):
    preference.grpo_loss(x, x, jnp.zeros(1), x, loss_type="ppo")
  with pytest.raises(ValueError, match="ref_log_probs"):
    preference.grpo_loss(x, x, jnp.zeros(1), x, kl_beta=0.1)
