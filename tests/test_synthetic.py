"""Synthetic survey: determinism, zero-shot split, and oracle vs sampled answers."""

import dataclasses
import filecmp

import numpy as np
import pytest
from scipy import stats

from cuma_jax.data.synthetic import SurveyOracle, SyntheticSurveyConfig, generate_survey
from cuma_jax.data.wvb import WvbReader

# 5,000 participants (about 38,000 answers): the near miss below is rejected at p ~ 1e-53 and
# the marginals are within 0.011 (a prior-blind marginal is 0.06 off).
BIG = SyntheticSurveyConfig(
  seed=3, num_questions=8, num_train=5_000, num_valid=0, num_test=0, num_zero_shot=500
)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
  """A large sample, so empirical answer frequencies are close to the oracle's."""
  survey = generate_survey(BIG)
  root = survey.write_wvb(tmp_path_factory.mktemp("big"))
  reader = WvbReader(root)
  examples = {split: list(reader.examples(split)) for split in ("train", "zero_shot")}
  return survey, SurveyOracle.load(root), examples


def _tree_files(root):
  return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_deterministic_from_seed(tmp_path):
  config = SyntheticSurveyConfig(num_train=50, num_valid=5, num_test=5, num_zero_shot=5)
  a = generate_survey(config).write_wvb(tmp_path / "a")
  b = generate_survey(config).write_wvb(tmp_path / "b")
  c = generate_survey(dataclasses.replace(config, seed=1)).write_wvb(tmp_path / "c")
  files = _tree_files(a)
  assert len(files) == 13 and files == _tree_files(b)  # 5 splits x 2 TSVs, 2 JSONs, oracle
  assert all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)
  assert not filecmp.cmp(a / files[-1], c / files[-1], shallow=False)


def test_zero_shot_profiles_never_seen_in_training(big):
  _, _, examples = big
  train = {e["profile"] for e in examples["train"]}
  zero_shot = {e["profile"] for e in examples["zero_shot"]}
  assert zero_shot and not train & zero_shot

  def cells(split):
    return {
      tuple(e["demographics"][f] for f in ("country", "age_group", "gender"))
      for e in examples[split]
    }

  assert not cells("train") & cells("zero_shot")


def _chi_square(examples, field, predicted):
  """Pearson statistic of observed answer counts vs summed predicted probabilities in each
  (profile field value, question) cell, and its p-value. Counts of independent draws with
  known probabilities vary at most as much as multinomial ones, so the test is conservative."""
  observed, expected = {}, {}
  for e in examples:
    key = (e["demographics"][field], e["question_id"])
    n = e["num_options"]
    observed.setdefault(key, np.zeros(n))[e["answer_option"]] += 1
    expected[key] = expected.get(key, np.zeros(n)) + predicted(e)
  chi2 = sum(((observed[k] - expected[k]) ** 2 / expected[k]).sum() for k in observed)
  dof = sum(len(v) - 1 for v in observed.values())
  return stats.chi2.sf(chi2, dof)


def test_oracle_matches_empirical_answers(big):
  _, oracle, examples = big
  train = examples["train"]
  for field in ("country", "religion", "age_group", "education"):
    p = _chi_square(
      train, field, lambda e: oracle.answer_distribution(e["profile"], e["question_id"])
    )
    assert p > 1e-4, (field, p)

  # The same test rejects a near miss: each participant given the mean culture posterior of
  # their country (right per country, blind to religion and age).
  country_posterior = {}
  for e in train:
    country_posterior.setdefault(e["demographics"]["country"], []).append(
      oracle.culture_posterior[e["profile"]]
    )
  country_posterior = {c: np.mean(v, axis=0) for c, v in country_posterior.items()}

  def country_only(e):
    q = oracle.question_ids.index(e["question_id"])
    table = oracle.answer_given_culture[:, q, : e["num_options"]]
    return country_posterior[e["demographics"]["country"]] @ table

  assert _chi_square(train, "religion", country_only) < 1e-10

  # Population marginal: the empirical answer frequencies of the training split.
  for q, question_id in enumerate(oracle.question_ids):
    answers = [e["answer_option"] for e in train if e["question_id"] == question_id]
    n = len(oracle.option_codes[q])
    empirical = np.bincount(answers, minlength=n) / len(answers)
    assert np.abs(empirical - oracle.population_marginal[q, :n]).max() < 0.02


def test_cultures_disagree_and_profiles_beat_the_population_mean(big):
  survey, oracle, examples = big
  # Cultures' modal answers differ on most questions (multi-modal population distributions).
  modes = survey.answer_given_culture.argmax(-1)  # [K, Q]
  assert np.mean([len(set(modes[:, q])) > 1 for q in range(modes.shape[1])]) >= 0.5
  for split in ("train", "zero_shot"):
    split_examples = examples[split]
    optimal = np.mean(
      [
        oracle.optimal_option(e["profile"], e["question_id"]) == e["answer_option"]
        for e in split_examples
      ]
    )
    collapsed = np.mean(
      [oracle.population_option(e["question_id"]) == e["answer_option"] for e in split_examples]
    )
    assert optimal > collapsed + 0.08, (split, optimal, collapsed)


def test_answer_distributions_are_normalised(big):
  survey, oracle, _ = big
  for q, codes in enumerate(oracle.option_codes):
    table = oracle.answer_given_culture[:, q]
    np.testing.assert_allclose(table[:, : len(codes)].sum(-1), 1.0)
    assert (table[:, len(codes) :] == 0).all()
  posterior = np.stack(list(oracle.culture_posterior.values()))
  np.testing.assert_allclose(posterior.sum(-1), 1.0)
  assert posterior.shape[1] == survey.config.num_cultures
