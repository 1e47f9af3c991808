"""Demographic encoders: pooling against Hugging Face's AutoModel, precomputed embeddings."""

import helpers
import numpy as np
import pytest
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from tokenizers import pre_tokenizers
import torch
import transformers

from cuma_jax.data import synthetic
from cuma_jax.encoders import DemographicEncoder, FittedNgramEncoder, PrecomputedEncoder


@pytest.mark.parametrize("pooling", ["mean", "mean_unmasked", "last_token"])
def test_demographic_encoder_matches_automodel_pooling(tiny_checkpoint, pretrained, pooling):
  directory, _ = tiny_checkpoint("qwen3_tied")
  words = [
    "you",
    "are",
    "a",
    "person",
    "from",
    "egypt",
    "chile",
    "japan",
    "age",
    "group",
    "16-24",
    "years",
    "old",
    "male",
    "female",
  ]
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


@pytest.fixture(scope="module")
def survey():
  return synthetic.generate_survey(
    synthetic.SyntheticSurveyConfig(
      num_train=1000, num_test=0, num_zero_shot=150, country_strength=5.0, answer_width=0.3, seed=3
    )
  )


def _answers(participants):
  """(profile, question index, option index) of every answered cell."""
  sentences = participants.profile_sentences()
  rows, questions = np.nonzero(participants.answers >= 0)
  return [sentences[r] for r in rows], questions, participants.answers[rows, questions]


def test_fitted_ngram_encoder_is_reduced_rank_ridge_on_word_ngrams(survey):
  profiles, questions, options = _answers(survey.participants["train"])
  encoder = FittedNgramEncoder.fit(profiles, questions, options, dim=5, ridge=2.0)
  # Oracle: scikit-learn's binary word uni+bigram features and ridge regression with an
  # intercept, on per-profile answer frequencies (unanswered: the population's frequencies).
  distinct = sorted(set(profiles))
  vectorizer = CountVectorizer(ngram_range=(1, 2), binary=True, token_pattern=r"(?u)\b\w+\b")
  features = vectorizer.fit_transform(distinct).toarray()
  assert set(vectorizer.vocabulary_) == set(encoder.vocabulary)
  width = options.max() + 1
  counts = np.zeros((len(distinct), questions.max() + 1, width))
  for p, q, o in zip(profiles, questions, options, strict=True):
    counts[distinct.index(p), q, o] += 1
  population = counts.sum(0) / counts.sum((0, 2))[:, None]
  n = counts.sum(-1, keepdims=True)
  targets = np.where(n > 0, counts / np.maximum(n, 1), population).reshape(len(distinct), -1)
  ridge = Ridge(alpha=2.0).fit(features, targets)
  fitted = ridge.predict(features) - targets.mean(0)
  _, s, vt = np.linalg.svd(fitted, full_matrices=False)
  scale = s[0] / np.sqrt(len(distinct))
  held_out = survey.participants["zero_shot"].profile_sentences()
  expected = (ridge.predict(vectorizer.transform(held_out).toarray()) - targets.mean(0)) @ vt[:5].T
  got = encoder.encode(held_out) * scale
  # Each direction is defined up to its sign.
  signs = np.sign((got * expected).sum(0))
  np.testing.assert_allclose(got * signs, expected, atol=1e-4)


def test_fitted_ngram_encoder_recovers_the_culture_of_unseen_profiles(survey):
  """A linear probe for the true culture, on profile cells never seen in training."""
  train, held_out = survey.participants["train"], survey.participants["zero_shot"]
  encoder = FittedNgramEncoder.fit(*_answers(train), dim=8, ridge=1.0)
  probe = LogisticRegression(max_iter=2000).fit(
    encoder.encode(train.profile_sentences()), train.posterior.argmax(-1)
  )
  accuracy = probe.score(
    encoder.encode(held_out.profile_sentences()), held_out.posterior.argmax(-1)
  )
  assert accuracy >= 0.9, accuracy


def test_fitted_ngram_encoder_refuses_more_dimensions_than_it_can_fit(survey):
  profiles, questions, options = _answers(survey.participants["train"])
  with pytest.raises(ValueError, match=r"at most \d+ dimensions.*demographic_dim <="):
    FittedNgramEncoder.fit(profiles, questions, options, dim=10_000, ridge=1.0)
