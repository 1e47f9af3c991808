"""The trainable/frozen split of an adapted decoder's parameters."""

from flax import traverse_util
from helpers import CUMA, adapter_inputs
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cuma_jax.params import merge_params, split_params


@pytest.mark.parametrize("mode", ["adapters", pytest.param("all", marks=pytest.mark.slow)])
def test_one_step_updates_only_trainable_parameters(tiny_checkpoint, pretrained, mode):
  _, torch_model = tiny_checkpoint("qwen3")
  ids, mask, z = adapter_inputs(torch_model.config.vocab_size, seed=5)
  module, params = pretrained("qwen3", adapter=CUMA)
  trainable, frozen = split_params(params, mode)
  frozen_before = jax.tree.map(np.array, frozen)

  def loss(trainable, frozen):
    logits, aux = module.apply(
      {"params": merge_params(trainable, frozen)}, ids, attention_mask=mask, demographics=z
    )
    return jnp.mean(logits**2) + 0.01 * aux["balance_loss"]

  grads = jax.jit(jax.grad(loss))(trainable, frozen)
  assert jax.tree.structure(grads) == jax.tree.structure(trainable)
  flat = traverse_util.flatten_dict(grads)
  if mode == "adapters":
    assert all(any(k.startswith("adapters_") for k in path) for path in flat)
    assert any(path[-1] == "b" and np.abs(g).sum() > 0 for path, g in flat.items())
  else:
    assert ("embed_tokens", "embedding") in flat
  tx = optax.adamw(1e-2)
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  new = optax.apply_updates(trainable, updates)
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(trainable), strict=True)
  )
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_frozen_bf16_trainable_fp32_split(pretrained):
  _, params = pretrained("qwen3", adapter=CUMA)
  trainable, frozen = split_params(params, frozen_dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype("bfloat16")}
