"""Tests for cuma_jax.evaluation.metrics against independent oracles.

Oracles: scipy.stats.wasserstein_distance for EMD, scikit-learn for macro-F1, hand-computed
examples (worked out in the comments) for the other metrics, and csv reading for the EMD
tool's input file.
"""

import csv
import math
import types

import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from cuma_jax import presets
from cuma_jax.data import prompts
from cuma_jax.evaluation import metrics, survey

# ----------------------------------------------------------------------------- classification


def test_accuracy():
  assert metrics.accuracy(list("ABCA"), list("ABBB")) == 0.5


def test_macro_f1_hand_example():
  true = list("AAABBC")
  pred = list("AABBCD")
  # A: TP=2 (0,1), FP=0, FN=1 (2)      -> P=1,   R=2/3, F1=0.8
  # B: TP=1 (3),   FP=1 (2), FN=1 (4)  -> P=1/2, R=1/2, F1=0.5
  # C: TP=0,       FP=1 (4), FN=1 (5)  -> P=0,   R=0,   F1=0
  # D: TP=0,       FP=1 (5), FN=0      -> P=0,   R undefined (0/0), F1=0 (zero_division=0)
  # macro = (0.8 + 0.5 + 0 + 0) / 4
  assert metrics.macro_f1(pred, true) == pytest.approx(0.325)


def test_macro_f1_matches_sklearn():
  from sklearn import metrics as sk_metrics

  rng = np.random.default_rng(0)
  true = rng.choice(list("ABCDE"), size=200)
  pred = rng.choice(list("ABCDEF"), size=200)
  expected = sk_metrics.f1_score(true, pred, average="macro", zero_division=0)
  assert metrics.macro_f1(pred, true) == pytest.approx(expected)


def test_country_macro_accuracy():
  # Country x: 1/1 correct, country y: 1/3 correct -> (1 + 1/3) / 2 (plain accuracy: 2/4).
  pred = list("AABC")
  true = list("AAAA")
  countries = ["x", "y", "y", "y"]
  assert metrics.country_macro_accuracy(pred, true, countries) == pytest.approx(2 / 3)


def test_sigma_inequity_hand_example():
  correct = np.array([1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 1], bool)
  groups = {
    # M: 4/6, F: 1/5, X: 1 sample (< 5, skipped) -> std([2/3, 1/5]) = (2/3 - 1/5) / 2 = 7/30
    "gender": ["M"] * 6 + ["F"] * 5 + ["X"],
    # old has 1 sample -> only one subgroup left -> dimension skipped
    "age": ["young"] * 11 + ["old"],
    # a: 4/6, b: 2/6 -> std = 1/6
    "region": ["a"] * 6 + ["b"] * 6,
  }
  # mean(7/30, 5/30) = 0.2
  assert metrics.sigma_inequity(correct, groups) == pytest.approx(0.2)
  # With every subgroup kept, X (accuracy 1) and the age dimension now count.
  gender_all = np.std([4 / 6, 1 / 5, 1.0])
  age_all = np.std([5 / 11, 1.0])
  expected = (gender_all + age_all + 1 / 6) / 3
  assert metrics.sigma_inequity(correct, groups, min_count=1) == pytest.approx(expected)


def test_sigma_inequity_nan_when_no_dimension_qualifies():
  assert math.isnan(metrics.sigma_inequity([True] * 6, {"gender": ["M"] * 6}))


# ----------------------------------------------------------------------------- EMD


@pytest.mark.parametrize(
  "scale, n_true, n_pred", [((1, 4), 50, 50), ((1, 10), 37, 91), ((0, 1), 5, 13), ((1, 5), 40, 1)]
)
def test_question_emd_matches_scipy(scale, n_true, n_pred):
  rng = np.random.default_rng(sum(scale) + n_true)
  lo, hi = scale
  true = rng.integers(lo, hi + 1, size=n_true)
  pred = rng.integers(lo, hi + 1, size=n_pred)
  expected = wasserstein_distance((true - lo) / (hi - lo), (pred - lo) / (hi - lo))
  assert metrics.question_emd(true, pred, lo, hi) == pytest.approx(expected, abs=1e-12)


def test_question_emd_extremes():
  # All mass at opposite ends of the normalised scale -> distance 1; identical samples -> 0.
  assert metrics.question_emd([1, 1], [4, 4, 4], 1, 4) == pytest.approx(1.0)
  assert metrics.question_emd([2, 3], [3, 2], 1, 4) == 0.0


def test_emd_by_question_matches_scipy_per_question():
  rng = np.random.default_rng(1)
  scales = {"Q7": (1, 4), "Q2": (1, 10), "Q31": (0, 1)}
  qids = rng.choice(list(scales), size=300)
  true = np.array([rng.integers(scales[q][0], scales[q][1] + 1) for q in qids])
  pred = np.array([rng.integers(scales[q][0], scales[q][1] + 1) for q in qids])
  emds = metrics.emd_by_question(qids, true, pred, scales)
  first_seen = list(dict.fromkeys(qids.tolist()))
  assert list(emds) == first_seen
  # Object arrays (e.g. from a pandas column) give the same plain-str keys.
  assert metrics.emd_by_question(qids.astype(object), true, pred, scales) == emds
  for q, (lo, hi) in scales.items():
    rows = qids == q
    span = hi - lo
    expected = wasserstein_distance((true[rows] - lo) / span, (pred[rows] - lo) / span)
    assert emds[q] == pytest.approx(expected, abs=1e-12)


def test_emd_by_question_missing_scale():
  with pytest.raises(KeyError, match="Q9"):
    metrics.emd_by_question(["Q1", "Q9"], [1, 2], [1, 2], {"Q1": (1, 4)})


def test_emd_summary_auc_identity():
  rng = np.random.default_rng(2)
  emds = rng.uniform(0, 1, size=40)
  summary = metrics.emd_summary({f"Q{i}": e for i, e in enumerate(emds)})
  assert summary["mean"] == pytest.approx(emds.mean())
  assert summary["median"] == pytest.approx(np.median(emds))
  # Exact identity for EMDs in [0, 1]: area under F(t) = P(emd <= t) over [0, 1] = 1 - mean.
  assert summary["auc"] == pytest.approx(1 - emds.mean(), abs=1e-12)
  # Independent check: trapezoid of the empirical curve on a fine threshold grid.
  grid = np.linspace(0, 1, 200_001)
  curve = np.searchsorted(np.sort(emds), grid, side="right") / emds.size
  assert summary["auc"] == pytest.approx(np.trapezoid(curve, grid), abs=1e-4)


def test_emd_summary_auc_clips_emds_above_one():
  # A question with EMD > 1 never enters the curve on [0, 1]: contributes 0, not negative.
  emds = np.array([0.25, 1.5])
  grid = np.linspace(0, 1, 200_001)
  curve = np.searchsorted(np.sort(emds), grid, side="right") / emds.size
  auc = metrics.emd_summary(emds)["auc"]
  assert auc == pytest.approx(0.375)
  assert auc == pytest.approx(np.trapezoid(curve, grid), abs=1e-4)


def test_emd_summary_released_auc_hand_example():
  # The released grid t = 0, 0.05, ..., 0.6; four questions, 25% each; F(t) in percent and the
  # trapezoid rule, so a step at a grid point counts half the interval before it:
  #   e = 0.0  : in from t = 0                                25 * 0.6               = 15
  #   e = 0.1  : half of [0.05, 0.1], then [0.1, 0.6]         25 * (0.025 + 0.5)     = 13.125
  #   e = 0.12 : half of [0.1, 0.15], then [0.15, 0.6]        25 * (0.025 + 0.45)    = 11.875
  #   e = 0.7  : above the last threshold                                            = 0
  # Total 40.0 (in [0, 60]); the exact AUC over [0, 1] is 1 - mean = 1 - 0.23 = 0.77.
  np.testing.assert_array_equal(metrics.RELEASED_AUC_THRESHOLDS, np.arange(13) * 0.05)
  summary = metrics.emd_summary([0.0, 0.1, 0.12, 0.7])
  assert summary["auc_released"] == pytest.approx(40.0, abs=1e-9)
  assert summary["auc"] == pytest.approx(0.77)


# ----------------------------------------------------------------------------- mean collapse


def test_prediction_entropy_hand_example():
  # q1: A,A,B,B -> ln 2 nats; q2: C,C,C -> 0; averaged over questions -> ln(2) / 2.
  qids = ["q1", "q2", "q1", "q2", "q1", "q2", "q1"]
  preds = ["A", "C", "A", "C", "B", "C", "B"]
  assert metrics.prediction_entropy(qids, preds) == pytest.approx(math.log(2) / 2)


def test_profile_diversity_hand_example():
  # q1: profiles p1,p2,p3 -> predictions A,A,B -> 2 distinct
  # q2: profiles p1,p2    -> predictions C,C   -> 1 distinct
  # q3: only profile p1   -> skipped (cannot show diversity)
  qids = ["q1", "q1", "q1", "q2", "q2", "q3", "q3"]
  profiles = ["p1", "p2", "p3", "p1", "p2", "p1", "p1"]
  preds = ["A", "A", "B", "C", "C", "A", "B"]
  assert metrics.profile_diversity(qids, profiles, preds) == pytest.approx(1.5)


def test_distinct_n_hand_example():
  texts = ["a b a b", "a b"]
  # unigrams: a b a b a b -> 2 unique / 6
  assert metrics.distinct_n(texts, 1) == pytest.approx(1 / 3)
  # bigrams: (a,b) (b,a) (a,b) | (a,b) -> 2 unique / 4
  assert metrics.distinct_n(texts, 2) == pytest.approx(0.5)
  # n-grams never cross texts: (a,b) | (a,b) -> 1 / 2, not (a,b) (b,a) (a,b) -> 2 / 3
  assert metrics.distinct_n(["a b", "a b"], 2) == pytest.approx(0.5)
  assert metrics.distinct_n(["a", "b"], 2) == 0.0


# ----------------------------------------------------------------------------- EMD tool input


def test_write_emd_input_round_trip(tmp_path):
  path = tmp_path / "preds.tsv"
  qids = ["Q1", "Q1", "Q2"]
  pids = [156070594, np.int64(586070648), 608070097]
  scores = [4, np.int32(3), 2]
  metrics.write_emd_input(path, qids, pids, scores)
  assert path.read_text().splitlines()[0] == "QUESTION_ID\tPARTICIPANT_ID\tSCORE"
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  assert rows == [
    {"QUESTION_ID": "Q1", "PARTICIPANT_ID": "156070594", "SCORE": "4"},
    {"QUESTION_ID": "Q1", "PARTICIPANT_ID": "586070648", "SCORE": "3"},
    {"QUESTION_ID": "Q2", "PARTICIPANT_ID": "608070097", "SCORE": "2"},
  ]


# ----------------------------------------------------------------------------- summarize


def test_summarize_wires_the_metrics():
  rng = np.random.default_rng(3)
  n = 120
  scales = {"Q1": (1, 4), "Q2": (1, 3)}
  qids = rng.choice(list(scales), size=n)
  true_codes = np.array([rng.integers(1, scales[q][1] + 1) for q in qids])
  pred_codes = np.array([rng.integers(1, scales[q][1] + 1) for q in qids])
  to_letter = np.array(list("ABCD"))
  true_letters, pred_letters = to_letter[true_codes - 1], to_letter[pred_codes - 1]
  countries = rng.choice(["Egypt", "Peru"], size=n)
  fields = {"gender": rng.choice(["Male", "Female"], size=n), "age": rng.choice(["a", "b"], n)}
  profiles = [
    f"{c}|{g}|{a}" for c, g, a in zip(countries, fields["gender"], fields["age"], strict=True)
  ]

  out = metrics.summarize(
    pred_letters, true_letters, pred_codes, true_codes, qids, countries, fields, scales
  )
  emds = metrics.emd_by_question(qids, true_codes, pred_codes, scales)
  emd = metrics.emd_summary(emds)
  assert out.pop("emd_by_question") == pytest.approx(emds)
  assert out == pytest.approx(
    {
      "accuracy": np.mean(pred_letters == true_letters),
      "macro_f1": metrics.macro_f1(pred_letters, true_letters),
      "country_macro_accuracy": metrics.country_macro_accuracy(
        pred_letters, true_letters, countries
      ),
      "sigma_inequity": metrics.sigma_inequity(pred_letters == true_letters, fields),
      "emd_mean": emd["mean"],
      "emd_median": emd["median"],
      "emd_auc": emd["auc"],
      "emd_auc_released": emd["auc_released"],
      "entropy_pred": metrics.prediction_entropy(qids, pred_letters),
      "entropy_true": metrics.prediction_entropy(qids, true_letters),
      "profile_diversity": metrics.profile_diversity(qids, profiles, pred_letters),
      "num_examples": n,
      "num_questions": 2,
    }
  )


class _Source(list):
  """A prepared split as score_predictions reads it: records plus the question table."""

  def __init__(self, records, questions):
    super().__init__(records)
    self.dataset_info = types.SimpleNamespace(metadata={"questions": questions})


def test_sigma_inequity_of_a_split_includes_country_by_default():
  # Ten answers to one question; the true option is always A. Country and gender vary, every
  # other profile field is constant (one subgroup: no spread, the dimension is skipped).
  countries = ["Chile"] * 5 + ["Peru"] * 5
  genders = ["Male", "Male", "Male", "Female", "Female", "Male", "Male"] + ["Female"] * 3
  correct = [1, 1, 1, 1, 0, 1, 1, 0, 0, 0]
  records = [
    {
      "question_id": "Q1",
      "profile": f"{c}|{g}",
      "option_codes": [1, 2, 3, 4],
      "answer_option": 0,
      "demographics": {**{f: "same" for f in prompts.PROFILE_FIELDS}, "country": c, "gender": g},
    }
    for c, g in zip(countries, genders, strict=True)
  ]
  source = _Source(records, [{"question_id": "Q1", "scale_min": 1, "scale_max": 4}])
  chosen = [0 if ok else 1 for ok in correct]
  # Country: Chile 4/5, Peru 2/5 -> std(0.8, 0.4) = 0.2.
  # Gender: Male (rows 0-2, 5, 6) 5/5, Female (rows 3, 4, 7-9) 1/5 -> std(1.0, 0.2) = 0.4.
  # Released (8 dimensions): mean(0.2, 0.4) = 0.3; without country: 0.4.
  with_country = survey.score_predictions(
    source, chosen, range(10), inequity_includes_country=True
  )["model"]
  without = survey.score_predictions(source, chosen, range(10), inequity_includes_country=False)
  assert with_country["sigma_inequity"] == pytest.approx(0.3)
  assert without["model"]["sigma_inequity"] == pytest.approx(0.4)
  assert with_country["country_macro_accuracy"] == pytest.approx(0.6)
  assert presets.experiment_config("cuma", "tiny").eval.inequity_includes_country is True
