"""Generation: cached decoding equals full recomputation, greedy equals Hugging Face."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from cuma_jax import generation, sharding
from cuma_jax.layers.adapter_config import AdapterConfig
from cuma_jax.models.decoder import init_cache
from cuma_jax.models.pretrained import load_pretrained

D_DEMO = 6


def _prompts(vocab, seed=0, padding="left"):
  """Three prompts of lengths 5, 3, 7 padded to 7 on ``padding``'s side."""
  rng = np.random.default_rng(seed)
  lengths = [5, 3, 7]
  ids = np.zeros((3, 7), np.int64)
  mask = np.zeros((3, 7), np.int64)
  for row, n in enumerate(lengths):
    cols = slice(7 - n, 7) if padding == "left" else slice(0, n)
    ids[row, cols] = rng.integers(1, vocab, n)
    mask[row, cols] = 1
  return ids, mask


@pytest.mark.device
@pytest.mark.parametrize("name", ["qwen3", pytest.param("llama3", marks=pytest.mark.slow)])
def test_greedy_equals_hugging_face_generate_left_padded(tiny_checkpoint, name):
  directory, torch_model = tiny_checkpoint(name)
  ids, mask = _prompts(torch_model.config.vocab_size)
  with torch.no_grad():
    expected = torch_model.generate(
      torch.as_tensor(ids),
      attention_mask=torch.as_tensor(mask),
      max_new_tokens=6,
      do_sample=False,
      pad_token_id=0,
      eos_token_id=None,
    )[:, ids.shape[1] :].numpy()
  module, params = load_pretrained(directory)
  sampling = generation.SamplingConfig(max_new_tokens=6)
  got = generation.generate(module, params, ids, mask, sampling)
  np.testing.assert_array_equal(got.tokens, expected)
  np.testing.assert_array_equal(got.lengths, 6)
  # Right padding gives the same continuations.
  right = generation.generate(
    module, params, *_prompts(torch_model.config.vocab_size, padding="right"), sampling
  )
  np.testing.assert_array_equal(right.tokens, expected)


def _randomize(params, seed):
  """Non-zero LoRA B (zero at init) so the adapters change the model."""
  rng = np.random.default_rng(seed)

  def visit(path, x):
    name = jax.tree_util.keystr(path)
    if name.endswith("['b']") or "prefix" in name:
      return jnp.asarray(rng.normal(size=x.shape) * 0.3, x.dtype)
    return x

  return jax.tree_util.tree_map_with_path(visit, params)


@pytest.mark.device
@pytest.mark.parametrize(
  "adapter",
  [
    AdapterConfig(
      targets=("q_proj", "v_proj", "o_proj", "down_proj"),
      rank=3,
      alpha=6.0,
      num_experts=4,
      top_k=2,
      router_hidden=(8,),
      demographic_dim=D_DEMO,
    ),
    pytest.param(AdapterConfig(targets=(), prefix_length=3), marks=pytest.mark.slow),
  ],
  ids=["cuma", "prefix"],
)
@pytest.mark.parametrize(
  "scan", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["loop", "scan"]
)
def test_cached_decoding_equals_full_recomputation(tiny_checkpoint, adapter, scan):
  directory, torch_model = tiny_checkpoint("qwen3")
  module, params = load_pretrained(
    directory, adapter=adapter, scan_layers=scan, rng=jax.random.key(1)
  )
  params = _randomize(params, 2)
  ids, mask = _prompts(torch_model.config.vocab_size, seed=3)
  z = np.random.default_rng(4).normal(size=(3, D_DEMO)).astype(np.float32)
  z = z if adapter.uses_demographics else None
  n = 5
  out = generation.generate(
    module,
    params,
    ids,
    mask,
    generation.SamplingConfig(max_new_tokens=n),
    demographics=z,
    return_logits=True,
  )
  # Full recomputation over prompt + generated tokens, no cache: the logits that chose
  # generated token i sit at the position before it.
  full_ids = np.concatenate([ids, out.tokens], axis=1)
  full_mask = np.concatenate([mask, np.ones_like(out.tokens)], axis=1)
  positions = np.maximum(np.cumsum(full_mask, 1) - 1, 0)
  logits, _ = module.apply(
    {"params": params},
    jnp.asarray(full_ids),
    attention_mask=jnp.asarray(full_mask),
    positions=jnp.asarray(positions),
    demographics=z,
  )
  expected = np.asarray(logits)[:, ids.shape[1] - 1 : ids.shape[1] - 1 + n]
  np.testing.assert_allclose(out.logits, expected, atol=1e-5, rtol=1e-5)
  assert not np.allclose(out.logits[:, 1:], out.logits[:, :1])  # not a degenerate constant


def test_stop_tokens_end_rows_and_pad_after(tiny_checkpoint):
  directory, torch_model = tiny_checkpoint("qwen3")
  module, params = load_pretrained(directory)
  ids, mask = _prompts(torch_model.config.vocab_size)
  free = generation.generate(module, params, ids, mask, generation.SamplingConfig(max_new_tokens=6))
  stop = int(free.tokens[0, 2])  # row 0 emits it at step 2 (maybe others earlier)
  sampling = generation.SamplingConfig(max_new_tokens=6, stop_tokens=(stop,), pad_token=0)
  out = generation.generate(module, params, ids, mask, sampling)
  for row in range(3):
    hits = np.flatnonzero(free.tokens[row] == stop)
    n = hits[0] + 1 if len(hits) else 6
    assert out.lengths[row] == n
    np.testing.assert_array_equal(out.tokens[row, :n], free.tokens[row, :n])
    np.testing.assert_array_equal(out.tokens[row, n:], 0)


def test_sampling_filters_match_numpy():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4000, 6)) * 2, jnp.float32)
  keys = jax.random.split(jax.random.key(0), 1)[0]
  for top_k, top_p in [(2, 1.0), (0, 0.6)]:
    sampling = generation.SamplingConfig(temperature=0.7, top_k=top_k, top_p=top_p)
    tokens = np.asarray(generation.choose(logits, sampling, keys))
    scaled = np.asarray(logits) / 0.7
    order = np.argsort(-scaled, axis=1)
    probs = np.exp(scaled - scaled.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    sorted_p = np.take_along_axis(probs, order, 1)
    if top_k:
      allowed = order[:, :top_k]
    else:
      count = (np.cumsum(sorted_p, 1) - sorted_p < top_p).sum(1)
      allowed = [order[i, : count[i]] for i in range(len(order))]
    assert all(t in a for t, a in zip(tokens, allowed, strict=True))
  with pytest.raises(ValueError, match=r"config\.sampling\.top_p=1\.5"):
    generation.SamplingConfig(top_p=1.5)
  with pytest.raises(ValueError, match="rng"):
    generation.generate(
      None, None, np.ones((1, 2)), np.ones((1, 2)), generation.SamplingConfig(temperature=1.0)
    )


def test_align_right_refuses_holes():
  with pytest.raises(ValueError, match="contiguous"):
    generation.align_right(np.ones((1, 4)), np.array([[1, 0, 1, 1]]), 0)


@pytest.mark.slow
def test_sharded_generation_equals_one_device_and_splits_the_cache(tiny_checkpoint):
  """On a data 2 x fsdp 4 mesh (fsdp rules: weights and batch split), decoding gives one
  device's tokens and logits, and the key/value cache is split over the batch axes."""
  directory, torch_model = tiny_checkpoint("qwen3")
  mesh = ml_collections.ConfigDict(
    {"rules_preset": "fsdp", "shape": (("data", 2), ("fsdp", 4)), "rules": ()}
  )
  layout = sharding.Layout.of(mesh)
  adapter = AdapterConfig(
    targets=("q_proj", "v_proj"), rank=4, num_experts=4, top_k=2, demographic_dim=D_DEMO
  )
  module, params = load_pretrained(directory, adapter=adapter, rng=jax.random.key(1))
  params = _randomize(params, 2)
  _, placed = load_pretrained(directory, adapter=adapter, rng=jax.random.key(1), layout=layout)
  placed = jax.tree.map(lambda p, v: jax.device_put(v, p.sharding), placed, params)
  rng = np.random.default_rng(5)
  ids = rng.integers(1, torch_model.config.vocab_size, (8, 6))
  mask = np.ones_like(ids)
  mask[::2, :2] = 0  # left padding on half the rows
  z = rng.normal(size=(8, D_DEMO)).astype(np.float32)
  sampling = generation.SamplingConfig(max_new_tokens=5)
  one = generation.generate(module, params, ids, mask, sampling, demographics=z, return_logits=True)
  split = generation.generate(
    module, placed, ids, mask, sampling, demographics=z, return_logits=True, layout=layout
  )
  np.testing.assert_array_equal(split.tokens, one.tokens)
  np.testing.assert_allclose(split.logits, one.logits, atol=1e-5, rtol=1e-5)
  with layout.active():
    cache = jax.jit(lambda: init_cache(module.config, 8, 16))()
  assert cache["key"].sharding.spec[1] == ("data", "fsdp")
