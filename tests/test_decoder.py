"""The decoder: logits parity with Hugging Face's PyTorch models (the oracle), the adapted
decoder against the frozen one and against LoRA written out, and full-size architectures
traced with jax.eval_shape against Hugging Face parameter counts."""

import os
import subprocess
import sys

from flax import traverse_util
import flax.linen as nn
import helpers
from helpers import CUMA, D_DEMO, adapter_inputs, randomise
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers

import cuma_jax
from cuma_jax.layers.adapter_config import AdapterConfig
from cuma_jax.models.config import ModelConfig
from cuma_jax.models.pretrained import abstract_params, build_decoder, load_pretrained

CONFIGS = os.path.join(os.path.dirname(cuma_jax.__file__), "architectures")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch(vocab, seed=0):
  """Three rows of 11 tokens, right padded to lengths 11, 7 and 4."""
  return helpers.padded_batch(vocab, [11, 7, 4], 11, seed)


def _torch_logits(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


# ----------------------------------------------------------------------------- parity


PARITY_ATOL = 1e-4  # float32 logits against PyTorch's
# bf16 weights and activations against the same model in float32: the largest logit error,
# as a fraction of the float32 logits' standard deviation over the batch.
BF16_SPREAD_FRACTION = 0.1


@pytest.mark.device
@pytest.mark.parametrize("name", ["qwen3", "qwen3_tied", "llama3", "llama_tied_bias"])
@pytest.mark.parametrize("scan_layers", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_logits_match_pytorch(tiny_checkpoint, pretrained, name, scan_layers):
  _, torch_model = tiny_checkpoint(name)
  ids, mask = _batch(torch_model.config.vocab_size)
  module, params = pretrained(name, scan_layers=scan_layers)
  logits = module.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  assert logits.shape == (3, 11, torch_model.config.vocab_size)
  assert logits.dtype == jnp.float32
  expected = _torch_logits(torch_model, ids, mask)
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[valid], expected[valid], atol=PARITY_ATOL, rtol=0)


def test_llama_fixture_depends_on_positions_far_beyond_the_tolerance(tiny_checkpoint):
  """The parity test above catches a decoder without RoPE only if the fixture's logits depend
  on positions: PyTorch's own model with rotary embeddings switched off moves them by at
  least 100 times the parity tolerance."""
  _, torch_model = tiny_checkpoint("llama3")
  ids, mask = _batch(torch_model.config.vocab_size)
  valid = mask.astype(bool)
  expected = _torch_logits(torch_model, ids, mask)
  llama = transformers.models.llama.modeling_llama
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(llama, "apply_rotary_pos_emb", lambda q, k, *args, **kwargs: (q, k))
    without_rope = _torch_logits(torch_model, ids, mask)
  assert np.abs(without_rope[valid] - expected[valid]).max() >= 100 * PARITY_ATOL


@pytest.mark.slow
def test_remat_and_scan_give_identical_logits(tiny_checkpoint, pretrained):
  _, torch_model = tiny_checkpoint("qwen3")
  ids, mask = _batch(torch_model.config.vocab_size, seed=1)
  outs = []
  for scan_layers, remat in [(False, "none"), (True, "full"), (False, "dots")]:
    module, params = pretrained("qwen3", scan_layers=scan_layers, remat=remat)
    outs.append(np.asarray(module.apply({"params": params}, ids, attention_mask=mask)))
  np.testing.assert_allclose(outs[1], outs[0], atol=1e-6, rtol=0)
  np.testing.assert_allclose(outs[2], outs[0], atol=1e-6, rtol=0)


def _zero_one_mlp(params):
  """``params`` with the second layer's MLP output projection zeroed (that MLP removed)."""
  flat = traverse_util.flatten_dict(params)
  path = ("layers_1", "mlp", "down_proj", "kernel")
  flat[path] = jnp.zeros_like(flat[path])
  return traverse_util.unflatten_dict(flat)


@pytest.mark.device
def test_bf16_compute_close_to_float32(tiny_checkpoint, pretrained):
  """bf16 weights and activations (fp32 norms/softmax) against the float32 decoder (itself
  checked against PyTorch above), at a tolerance that scales with the logits' spread: tight
  enough that a model missing one MLP fails by a wide margin."""
  _, torch_model = tiny_checkpoint("llama3")
  ids, mask = _batch(torch_model.config.vocab_size, seed=2)
  valid = mask.astype(bool)
  module, params = pretrained("llama3", dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
  reference_module, reference_params = pretrained("llama3")
  reference = reference_module.apply({"params": reference_params}, ids, attention_mask=mask)
  expected = np.asarray(reference)[valid]
  tolerance = BF16_SPREAD_FRACTION * expected.std()

  def error(p):
    logits = np.asarray(module.apply({"params": p}, ids, attention_mask=mask), np.float32)
    return np.abs(logits[valid] - expected).max()

  assert error(params) <= tolerance
  # The margin: without its last MLP the bf16 model is off by several tolerances.
  assert error(_zero_one_mlp(params)) >= 5 * tolerance


@pytest.mark.parametrize("scan_layers", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_hidden_states_variant_matches_automodel(tiny_checkpoint, tmp_path, scan_layers):
  directory, torch_model = tiny_checkpoint("qwen3_tied")
  # Qwen3-Embedding checkpoints are saved from the bare model: tensors have no "model." prefix.
  base = transformers.AutoModel.from_pretrained(directory).eval()
  base.save_pretrained(tmp_path)
  ids, mask = _batch(torch_model.config.vocab_size, seed=3)
  for source in (directory, str(tmp_path)):
    module, params = load_pretrained(source, output="hidden_states", scan_layers=scan_layers)
    hidden = module.apply({"params": params}, ids, attention_mask=mask)
    with torch.no_grad():
      expected = base(
        input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
      ).last_hidden_state.numpy()
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[valid], expected[valid], atol=1e-4, rtol=0)


# The parity tests, run again at XLA's default optimisation level: the suite compiles with
# XLA:CPU's costly passes off (platforms.FAST_CPU_COMPILE_FLAGS), and a fault that only the
# optimised program has (a fusion, a reassociated reduction) would pass there.
# One of each (unscanned: scanning repeats the same layer body), to keep the suite fast.
DEFAULT_LEVEL_TESTS = (
  *(
    f"tests/test_decoder.py::test_logits_match_pytorch[False-{name}]"
    for name in ("qwen3", "qwen3_tied", "llama3", "llama_tied_bias")
  ),
  "tests/test_decoder.py::test_bf16_compute_close_to_float32",
  *(
    f"tests/test_adapter.py::test_adapter_group_matches_oracle[False-False-{strategy}]"
    for strategy in ("dense", "ragged")
  ),
)


@pytest.mark.slow  # a second pytest, compiling at XLA's default level
def test_parity_holds_at_xla_default_optimisation_level():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider"]
    + ["-W", "ignore", *DEFAULT_LEVEL_TESTS],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert f"{len(DEFAULT_LEVEL_TESTS)} passed" in proc.stdout.splitlines()[-1], proc.stdout[-1000:]


# ----------------------------------------------------------------------------- adapted decoder


@pytest.mark.parametrize(
  "adapter",
  [
    CUMA,
    pytest.param(
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
      marks=pytest.mark.slow,
    ),
    pytest.param(AdapterConfig(targets=(), prefix_length=3), marks=pytest.mark.slow),
  ],
)
def test_adapted_model_at_init_equals_frozen_model(tiny_checkpoint, pretrained, adapter):
  _, torch_model = tiny_checkpoint("qwen3")
  ids, mask, z = adapter_inputs(torch_model.config.vocab_size)
  base_module, base_params = pretrained("qwen3")
  module, params = pretrained("qwen3", adapter=adapter, rng=jax.random.key(3))
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


@pytest.mark.slow  # fast at the layer: test_adapter.py
def test_one_expert_mixture_equals_plain_lora(tiny_checkpoint, pretrained):
  _, torch_model = tiny_checkpoint("llama3")
  ids, mask, z = adapter_inputs(torch_model.config.vocab_size, seed=4)
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
  lora_module, lora_params = pretrained("llama3", adapter=lora)
  lora_params = randomise(lora_params, 1, scale=0.05, names={"b"})
  moe_module, moe_params = pretrained("llama3", adapter=moe)
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
  base_module, base_params = pretrained("llama3")
  assert not np.allclose(
    np.asarray(a), np.asarray(base_module.apply({"params": base_params}, ids, attention_mask=mask))
  )


def test_lora_projection_matches_numpy_formula(pretrained):
  """Only down_proj adapted: its delta from the loaded parameters vs (alpha / r) h A B."""
  adapter = AdapterConfig(
    targets=("down_proj",),
    rank=3,
    alpha=6.0,
    num_experts=1,
    top_k=1,
    router="none",
  )
  module, params = pretrained("qwen3", adapter=adapter)
  params = randomise(params, 1, scale=0.05, names={"b"})
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


@pytest.mark.slow
def test_scanned_and_unscanned_adapted_models_agree(tiny_checkpoint, pretrained):
  _, torch_model = tiny_checkpoint("qwen3")
  ids, mask, z = adapter_inputs(torch_model.config.vocab_size, seed=6)
  m1, p1 = pretrained("qwen3", adapter=CUMA)
  m2, p2 = pretrained("qwen3", adapter=CUMA, scan_layers=True)
  p1 = randomise(p1, 1, scale=0.05, names={"b"})
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


# ----------------------------------------------------------------------------- full-size shapes


@pytest.mark.parametrize(
  "filename, output, expected",
  [
    ("qwen3-8b.json", "logits", 8_190_735_360),
    ("llama-3.1-8b.json", "logits", 8_030_261_248),
    ("qwen3-embedding-0.6b.json", "hidden_states", 595_776_512),
  ],
)
@pytest.mark.parametrize("scan_layers", [False, True])
def test_parameter_count_matches_hugging_face(filename, output, expected, scan_layers):
  config = ModelConfig.from_pretrained(os.path.join(CONFIGS, filename))
  module = build_decoder(config, output=output, scan_layers=scan_layers)
  shapes = nn.unbox(abstract_params(module))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == expected


@pytest.mark.parametrize(
  "name",
  [
    "qwen3-0.6b",
    *(pytest.param(n, marks=pytest.mark.slow) for n in ("qwen3-1.7b", "qwen3-4b", "qwen3-8b")),
  ],
)
def test_bundled_qwen3_sizes_count_as_hugging_face_builds_them(name):
  # The sizes the TPU notebook plans over: Hugging Face's own model, built on the meta
  # device from the same file, is the count (a tied head is one tensor in both).
  path = os.path.join(CONFIGS, f"{name}.json")
  with torch.device("meta"):
    reference = transformers.Qwen3ForCausalLM(transformers.Qwen3Config.from_json_file(path))
  shapes = nn.unbox(abstract_params(build_decoder(ModelConfig.from_pretrained(path))))
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert ours == sum(p.numel() for p in reference.parameters())


def test_every_parameter_has_logical_axes():
  config = ModelConfig.from_pretrained(os.path.join(CONFIGS, "qwen3-8b.json"))
  boxed = abstract_params(build_decoder(config, scan_layers=True))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim
    assert "layers" not in leaf.names or leaf.names[0] == "layers"


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
