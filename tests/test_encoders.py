"""Demographic encoders: pooling against Hugging Face's AutoModel, precomputed embeddings."""

import helpers
import numpy as np
import pytest
from tokenizers import pre_tokenizers
import torch
import transformers

from cuma_jax.encoders import DemographicEncoder, PrecomputedEncoder


@pytest.mark.parametrize("pooling", ["mean", "mean_unmasked", "last_token"])
def test_demographic_encoder_matches_automodel_pooling(tiny_checkpoint, pretrained, pooling):
  directory, _ = tiny_checkpoint("qwen3_tied")
  words = "you are a person from egypt chile japan age group 16-24 years old male female".split()
  vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
  tokenizer = helpers.word_level_tokenizer(
    vocab, "<unk>", pad_token="<pad>", pre_tokenizer=pre_tokenizers.WhitespaceSplit()
  )
  module, params = pretrained("qwen3_tied", output="hidden_states")
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
  vectors = np.arange(6, dtype=np.float32).reshape(2, 3)
  np.savez(tmp_path / "z.npz", profiles=np.array(["p one", "p two"]), embeddings=vectors)
  encoder = PrecomputedEncoder(tmp_path / "z.npz")
  np.testing.assert_array_equal(encoder.encode(["p two", "p one", "p two"]), vectors[[1, 0, 1]])
  with pytest.raises(KeyError, match="p three"):
    encoder.encode(["p three"])
