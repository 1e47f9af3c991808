"""The adapted decoder: exactness at init, LoRA equivalence, the trainable split, counts."""

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
import torch
import transformers

from cuma_jax import param_count, presets
from cuma_jax.encoders import DemographicEncoder
from cuma_jax.layers.adapter_config import AdapterConfig
from cuma_jax.models.pretrained import load_pretrained
from cuma_jax.params import merge_params, split_params

D_DEMO = 6
CUMA = AdapterConfig(
  targets=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
  rank=4,
  alpha=8.0,
  num_experts=4,
  top_k=2,
  router_hidden=(16,),
  demographic_dim=D_DEMO,
  strategy="dense",
)


def _inputs(vocab, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, size=(2, 9))
  mask = np.ones((2, 9), np.int32)
  mask[1, 6:] = 0
  z = rng.normal(size=(2, D_DEMO)).astype(np.float32)
  return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(z)


def _randomize_b(params, seed=1):
  """B starts at zero; give it values so that adapters change the output."""
  flat = traverse_util.flatten_dict(params)
  key = jax.random.key(seed)
  for path, value in flat.items():
    if path[-1] == "b":
      key, sub = jax.random.split(key)
      flat[path] = 0.05 * jax.random.normal(sub, value.shape, value.dtype)
  return traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize(
  "adapter",
  [
    CUMA,
    AdapterConfig(
      targets=("q_proj", "k_proj", "v_proj"),
      rank=4,
      alpha=8.0,
      num_experts=3,
      top_k=1,
      shared_a=True,
      router="token",
      share_router=True,
      strategy="ragged",
      gate="softmax_top_logits",
    ),
    AdapterConfig(targets=(), prefix_length=3),
  ],
)
def test_adapted_model_at_init_equals_frozen_model(tiny_checkpoint, adapter):
  directory, torch_model = tiny_checkpoint("qwen3")
  ids, mask, z = _inputs(torch_model.config.vocab_size)
  base_module, base_params = load_pretrained(directory)
  module, params = load_pretrained(directory, adapter=adapter, rng=jax.random.key(3))
  expected = base_module.apply({"params": base_params}, ids, attention_mask=mask)
  logits, aux = module.apply(
    {"params": params},
    ids,
    attention_mask=mask,
    demographics=z if adapter.uses_demographics else None,
  )
  if adapter.prefix_length:
    # Prefixes are not a zero-initialised residual: they must change the output.
    assert not np.allclose(logits, expected)
  else:
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(expected))
  assert np.isfinite(float(aux["balance_loss"]))


def test_prefix_init_is_normal_with_the_configured_std(tiny_checkpoint):
  # PEFT's prefix (an nn.Embedding, no projection) starts at normal(0, 1); 0.1 is any other.
  directory, _ = tiny_checkpoint("qwen3")
  for std in (1.0, 0.1):
    adapter = AdapterConfig(targets=(), prefix_length=32, prefix_init_std=std)
    _, params = load_pretrained(directory, adapter=adapter, rng=jax.random.key(5))
    flat = traverse_util.flatten_dict(params)
    values = np.concatenate(
      [np.asarray(v).ravel() for p, v in flat.items() if p[-1].startswith("prefix_")]
    )
    assert values.size >= 1000
    assert scipy.stats.kstest(values, scipy.stats.norm(0.0, std).cdf).pvalue > 1e-3


def test_one_expert_mixture_equals_plain_lora(tiny_checkpoint):
  directory, torch_model = tiny_checkpoint("llama3")
  ids, mask, z = _inputs(torch_model.config.vocab_size, seed=4)
  targets = ("q_proj", "v_proj", "down_proj")
  lora = AdapterConfig(targets=targets, rank=4, alpha=8.0, num_experts=1, top_k=1, router="none")
  moe = AdapterConfig(
    targets=targets,
    rank=4,
    alpha=8.0,
    num_experts=1,
    top_k=1,
    demographic_dim=D_DEMO,
    router_hidden=(8,),
  )
  lora_module, lora_params = load_pretrained(directory, adapter=lora)
  lora_params = _randomize_b(lora_params)
  moe_module, moe_params = load_pretrained(directory, adapter=moe)
  # Copy LoRA's A and B into the 1-expert mixture; its router stays random.
  flat_moe = traverse_util.flatten_dict(moe_params)
  flat_lora = traverse_util.flatten_dict(lora_params)
  for path in flat_lora:
    flat_moe[path] = flat_lora[path]
  moe_params = traverse_util.unflatten_dict(flat_moe)
  a, _ = lora_module.apply({"params": lora_params}, ids, attention_mask=mask)
  b, _ = moe_module.apply({"params": moe_params}, ids, attention_mask=mask, demographics=z)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # And the (randomised) LoRA really changes the model; the next test checks its formula.
  base_module, base_params = load_pretrained(directory)
  assert not np.allclose(
    np.asarray(a), np.asarray(base_module.apply({"params": base_params}, ids, attention_mask=mask))
  )


def test_lora_projection_matches_numpy_formula(tiny_checkpoint):
  """Only down_proj adapted: its delta from the loaded parameters vs (alpha / r) h A B."""
  directory, _ = tiny_checkpoint("qwen3")
  adapter = AdapterConfig(
    targets=("down_proj",),
    rank=3,
    alpha=6.0,
    num_experts=1,
    top_k=1,
    router="none",
  )
  module, params = load_pretrained(directory, adapter=adapter)
  params = _randomize_b(params)
  lora = params["layers_0"]["mlp"]["adapters_out"]["down_proj_lora"]
  h = np.random.default_rng(0).normal(size=(1, 5, 48)).astype(np.float32)
  from cuma_jax.layers.adapter import LoraExperts
  from cuma_jax.layers.routing import Routing

  experts = LoraExperts(
    features=32, num_experts=1, rank=3, alpha=6.0, shared_a=False, strategy="dense"
  )
  routing = Routing(
    gates=jnp.ones((1, 5, 1)), experts=jnp.zeros((1, 5, 1), jnp.int32), probs=jnp.ones((1, 5, 1))
  )
  delta = experts.apply({"params": lora}, jnp.asarray(h), routing)
  a = np.asarray(lora["a"]).reshape(48, 3)
  b = np.asarray(lora["b"]).reshape(3, 32)
  np.testing.assert_allclose(np.asarray(delta), (6.0 / 3) * h @ a @ b, atol=1e-6)


@pytest.mark.parametrize("mode", ["adapters", "all"])
def test_one_step_updates_only_trainable_parameters(tiny_checkpoint, mode):
  directory, torch_model = tiny_checkpoint("qwen3")
  ids, mask, z = _inputs(torch_model.config.vocab_size, seed=5)
  module, params = load_pretrained(directory, adapter=CUMA)
  trainable, frozen = split_params(params, mode)
  frozen_before = jax.tree.map(np.array, frozen)

  def loss(trainable, frozen):
    logits, aux = module.apply(
      {"params": merge_params(trainable, frozen)}, ids, attention_mask=mask, demographics=z
    )
    return jnp.mean(logits**2) + 0.01 * aux["balance_loss"]

  grads = jax.grad(loss)(trainable, frozen)
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
    not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(trainable))
  )
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_frozen_bf16_trainable_fp32_split(tiny_checkpoint):
  directory, _ = tiny_checkpoint("qwen3")
  _, params = load_pretrained(directory, adapter=CUMA)
  trainable, frozen = split_params(params, frozen_dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype("bfloat16")}


def test_scanned_and_unscanned_adapted_models_agree(tiny_checkpoint):
  directory, torch_model = tiny_checkpoint("qwen3")
  ids, mask, z = _inputs(torch_model.config.vocab_size, seed=6)
  m1, p1 = load_pretrained(directory, adapter=CUMA)
  m2, p2 = load_pretrained(directory, adapter=CUMA, scan_layers=True)
  p1 = _randomize_b(p1)
  # Stack the unscanned adapter params into the scanned layout.
  layers = [p1[f"layers_{i}"] for i in range(2)]
  p2 = dict(p2, layers=jax.tree.map(lambda *x: jnp.stack(x), *layers))
  a, aux_a = m1.apply({"params": p1}, ids, attention_mask=mask, demographics=z)
  b, aux_b = m2.apply({"params": p2}, ids, attention_mask=mask, demographics=z)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  np.testing.assert_allclose(float(aux_a["balance_loss"]), float(aux_b["balance_loss"]), rtol=1e-6)
  for key, counts in aux_a["expert_counts"].items():
    assert counts.shape == (2, 4)
    # Each non-padded token sends top_k assignments per router per layer.
    np.testing.assert_array_equal(np.asarray(counts).sum(-1), [(9 + 6) * 2] * 2)
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(aux_b["expert_counts"][key]))


@pytest.mark.parametrize(
  "method, preset, percent",
  [
    ("cuma", "qwen3_8b_r8", 1.53),
    ("cuma", "qwen3_8b_r64", 4.15),
    ("hydralora", "qwen3_8b_r64", 2.31),
    ("lora", "qwen3_8b_r64", 0.37),
    ("mixlora", "qwen3_8b_r64", 3.01),
  ],
)
def test_trainable_percentages_reproduce_the_paper(method, preset, percent):
  counts = param_count.count_parameters(presets.experiment_config(method, preset))
  assert counts["backbone"] == 8_190_735_360
  assert round(counts["trainable_percent"], 2) == percent


@pytest.mark.parametrize(
  "preset, layers, d_out",
  [("qwen3_8b_r64_released", 36, (4096, 1024)), ("llama31_8b_r64_released", 32, (4096, 1024))],
)
def test_released_layout_counts(preset, layers, d_out):
  # One A [4096, 64] per target shared by its 8 experts, per-expert B [8, 64, d_out], and one
  # router per layer for both targets (they read the same input): (4096 + 1024) * 256 + 256
  # + 256 * 8 + 8. Qwen3-8B: q_proj + v_proj; Llama-3.1-8B (released script): q_proj + k_proj.
  d, r, n, h, d_z = 4096, 64, 8, 256, 1024
  per_layer = sum(d * r + n * r * out for out in d_out) + (d + d_z) * h + h + h * n + n
  config = presets.experiment_config("cuma", preset)
  assert config.adapter.shared_a and config.adapter.share_router
  assert param_count.count_parameters(config)["trainable"] == layers * per_layer


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(top_k=0), r"top_k"),
    (dict(top_k=9, num_experts=8), r"top_k"),
    (dict(rank=0), r"rank"),
    (dict(targets=("qkv_proj",)), r"q_proj.*down_proj"),
    (dict(gate="hard"), r"adapter.gate.*softmax_top_probs"),
    (dict(strategy="sparse"), r"strategy.*dense"),
  ],
)
def test_bad_adapter_configs_fail_at_construction(kwargs, message):
  with pytest.raises(ValueError, match=message):
    AdapterConfig(**kwargs)


def test_demographics_shape_is_checked(tiny_checkpoint):
  directory, torch_model = tiny_checkpoint("qwen3")
  ids, mask, z = _inputs(torch_model.config.vocab_size)
  module, params = load_pretrained(directory, adapter=CUMA)
  for bad in (z[:1], jnp.zeros((2, D_DEMO + 1)), None):
    with pytest.raises(ValueError, match=r"demographic"):
      module.apply({"params": params}, ids, attention_mask=mask, demographics=bad)


@pytest.mark.parametrize("pooling", ["mean", "mean_unmasked", "last_token"])
def test_demographic_encoder_matches_automodel_pooling(tiny_checkpoint, pooling):
  directory, _ = tiny_checkpoint("qwen3_tied")
  from tokenizers import Tokenizer, models, pre_tokenizers

  words = "you are a person from egypt chile japan age group 16-24 years old male female".split()
  vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>"
  )
  module, params = load_pretrained(directory, output="hidden_states")
  encoder = DemographicEncoder(module, params, tokenizer, pooling=pooling, batch_size=8)
  texts = [
    "you are a person from egypt",
    "age group 16-24 years old male chile japan female",
    "you are a person from egypt",
  ]
  got = encoder.encode(texts)
  base = transformers.AutoModel.from_pretrained(directory).eval()
  batch = tokenizer(sorted(set(texts)), padding=True, return_tensors="pt")
  with torch.no_grad():
    hidden = base(**batch).last_hidden_state.numpy()
  m = batch["attention_mask"].numpy()[..., None].astype(np.float32)
  if pooling == "mean":
    expected = (hidden * m).sum(1) / m.sum(1)
  elif pooling == "mean_unmasked":
    expected = hidden.mean(1)  # The released code: padding positions leak into the mean.
  else:
    last = hidden[np.arange(len(hidden)), m[..., 0].sum(1).astype(int) - 1]
    expected = last / np.linalg.norm(last, axis=-1, keepdims=True)
  order = {t: i for i, t in enumerate(sorted(set(texts)))}
  np.testing.assert_allclose(got, expected[[order[t] for t in texts]], atol=1e-4)
  assert len(encoder._cache) == 2  # The repeated profile was encoded once.


def test_precomputed_embeddings_are_accepted(tmp_path):
  from cuma_jax.encoders import PrecomputedEncoder

  vectors = np.arange(6, dtype=np.float32).reshape(2, 3)
  np.savez(tmp_path / "z.npz", profiles=np.array(["p one", "p two"]), embeddings=vectors)
  encoder = PrecomputedEncoder(tmp_path / "z.npz")
  np.testing.assert_array_equal(encoder.encode(["p two", "p one", "p two"]), vectors[[1, 0, 1]])
  with pytest.raises(KeyError, match="p three"):
    encoder.encode(["p three"])
