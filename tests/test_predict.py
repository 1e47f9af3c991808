"""Restricted-argmax prediction over the answer letters' tokens.

Oracles: hand-made logits for the argmax, a numpy log-softmax for option log-probs, and a
fixed word-level vocabulary for the letters' token ids.
"""

import helpers
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import normalizers, pre_tokenizers

from cuma_jax.evaluation.predict import letter_token_ids, option_log_probs, restricted_argmax


def test_restricted_argmax_ignores_tokens_outside_the_options():
  logits = jnp.array(
    [
      [0.0, 0.0, 1.0, 3.0, 2.0, 0.0, 0.0, 100.0],  # token 7 is not an option
      [50.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.0],  # token 0 is a padded option
    ]
  )
  option_ids = jnp.array([[2, 3, 4], [5, 6, 0]])
  mask = jnp.array([[True, True, True], [True, True, False]])
  np.testing.assert_array_equal(restricted_argmax(logits, option_ids, mask), [1, 1])


def test_option_log_probs_renormalise_over_valid_options():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 10)).astype(np.float32)
  option_ids = np.array([[3, 1, 7, 0], [2, 9, 0, 0]])
  mask = np.array([[True, True, True, True], [True, True, False, False]])
  out = np.asarray(option_log_probs(jnp.asarray(logits), option_ids, mask))
  for b in range(2):
    valid = logits[b, option_ids[b][mask[b]]]
    expected = valid - np.log(np.sum(np.exp(valid)))
    np.testing.assert_allclose(out[b][mask[b]], expected, rtol=1e-5)
    assert np.all(np.isneginf(out[b][~mask[b]]))


def _tokenizer(prefix_space: bool):
  """WordLevel tokenizer over {A, B, C}; with prefix_space, "A" encodes as ["▁", "A"]."""
  vocab = {"[UNK]": 0, "▁": 1, "A": 2, "B": 3, "C": 4}
  if not prefix_space:
    return helpers.word_level_tokenizer(vocab, "[UNK]")
  return helpers.word_level_tokenizer(
    vocab,
    "[UNK]",
    normalizer=normalizers.Prepend("▁"),
    pre_tokenizer=pre_tokenizers.Split("▁", behavior="isolated"),
  )


def test_letter_token_ids():
  assert letter_token_ids(_tokenizer(prefix_space=False), "CAB") == [4, 2, 3]


def test_letter_token_ids_rejects_multi_token_letter():
  with pytest.raises(ValueError, match="'A' is not a single token"):
    letter_token_ids(_tokenizer(prefix_space=True), "AB")


def test_letter_token_ids_rejects_unknown_letter():
  with pytest.raises(ValueError, match="'D'"):
    letter_token_ids(_tokenizer(prefix_space=False), "ABCD")
