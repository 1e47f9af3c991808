"""Logits parity with Hugging Face's PyTorch models (the oracle)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import cuma_jax
from cuma_jax.models.pretrained import load_pretrained


def _batch(vocab, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, size=(3, 11))
  lengths = np.array([11, 7, 4])  # Right padding.
  mask = (np.arange(11)[None] < lengths[:, None]).astype(np.int64)
  return ids, mask


def _torch_logits(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("name", ["qwen3", "qwen3_tied", "llama3", "llama_tied_bias"])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_logits_match_pytorch(tiny_checkpoint, name, scan_layers):
  directory, torch_model = tiny_checkpoint(name)
  ids, mask = _batch(torch_model.config.vocab_size)
  module, params = load_pretrained(directory, scan_layers=scan_layers)
  logits = module.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  assert logits.shape == (3, 11, torch_model.config.vocab_size)
  assert logits.dtype == jnp.float32
  expected = _torch_logits(torch_model, ids, mask)
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[valid], expected[valid], atol=1e-4, rtol=0)


def test_remat_and_scan_give_identical_logits(tiny_checkpoint):
  directory, torch_model = tiny_checkpoint("qwen3")
  ids, mask = _batch(torch_model.config.vocab_size, seed=1)
  outs = []
  for scan_layers, remat in [(False, "none"), (True, "full"), (False, "dots")]:
    module, params = load_pretrained(directory, scan_layers=scan_layers, remat=remat)
    outs.append(np.asarray(module.apply({"params": params}, ids, attention_mask=mask)))
  np.testing.assert_allclose(outs[1], outs[0], atol=1e-6, rtol=0)
  np.testing.assert_allclose(outs[2], outs[0], atol=1e-6, rtol=0)


def test_bf16_compute_close_to_float32_pytorch(tiny_checkpoint):
  """bf16 weights and activations (fp32 norms/softmax): tolerance 5e-2 on logits of O(1)."""
  directory, torch_model = tiny_checkpoint("llama3")
  ids, mask = _batch(torch_model.config.vocab_size, seed=2)
  module, params = load_pretrained(directory, dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
  logits = module.apply({"params": params}, ids, attention_mask=mask)
  expected = _torch_logits(torch_model, ids, mask)
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[valid], expected[valid], atol=5e-2, rtol=0)


@pytest.mark.parametrize("scan_layers", [False, True])
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


def test_top_level_entry_point():
  assert cuma_jax.load_pretrained is load_pretrained
