"""WorldValuesBench evaluation metrics (docs/evaluation.md), as pure numpy functions.

Every function takes flat per-example arrays (one entry per (participant, question) example)
and returns plain Python floats or dicts, so results can be logged or JSON-dumped directly.

- Classification quality: :func:`accuracy`, :func:`macro_f1`, :func:`country_macro_accuracy`.
- Fairness across subgroups: :func:`sigma_inequity`.
- Distributional alignment: :func:`question_emd`, :func:`emd_by_question`, :func:`emd_summary`,
  and :func:`write_emd_input` to cross-check with WorldValuesBench's own EMD tool.
- Mean-collapse analyses: :func:`prediction_entropy`, :func:`profile_diversity`,
  :func:`distinct_n`.
- :func:`summarize` bundles the main metrics for the trainer's evaluation loop.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
import csv
import os
from typing import TypedDict

import numpy as np
from numpy.typing import ArrayLike


def _paired(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  """Return ``a`` and ``b`` as 1-D arrays of the same non-zero length, or raise ValueError."""
  a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
  if a.shape != b.shape:
    raise ValueError(f"length mismatch: {a.size} vs {b.size}")
  if a.size == 0:
    raise ValueError("empty input")
  return a, b


def accuracy(pred_letters: ArrayLike, true_letters: ArrayLike) -> float:
  """Fraction of examples whose predicted option letter equals the true one (exact match)."""
  pred, true = _paired(pred_letters, true_letters)
  return float(np.mean(pred == true))


def macro_f1(pred: ArrayLike, true: ArrayLike) -> float:
  """Unweighted mean over letters of the per-letter F1 score.

  The labels are the union of the letters seen in ``true`` or ``pred``, so a letter the model
  predicts but never occurs (or occurs but is never predicted) counts with F1 = 0; this is
  what penalises a model that collapses onto a few popular options. Per letter,
  F1 = 2 TP / (2 TP + FP + FN), which equals 2PR / (P + R) and is 0 where precision or recall
  is undefined, matching ``sklearn.metrics.f1_score(average="macro", zero_division=0)``.
  """
  pred, true = _paired(pred, true)
  labels, inverse = np.unique(np.concatenate([pred, true]), return_inverse=True)
  pred_idx, true_idx = inverse[: pred.size], inverse[pred.size :]
  n = labels.size
  tp = np.bincount(true_idx[pred_idx == true_idx], minlength=n)
  fp = np.bincount(pred_idx, minlength=n) - tp
  fn = np.bincount(true_idx, minlength=n) - tp
  # 2TP + FP + FN > 0 for every label: each label occurs in pred or true at least once.
  return float(np.mean(2 * tp / (2 * tp + fp + fn)))


def _group_rows(keys: np.ndarray) -> list[tuple[Hashable, np.ndarray]]:
  """(key, row indices) for every distinct key, in order of first appearance.

  One sort instead of a boolean scan per key keeps per-question loops linear in the number
  of examples (millions at full WVB test size).
  """
  unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
  order = np.argsort(inverse, kind="stable")
  rows = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
  keys = unique.tolist()  # Python scalars whatever the dtype (str, int or object)
  return [(keys[u], rows[u]) for u in np.argsort(first)]


def _group_means(values: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per distinct label (sorted), the mean of ``values`` and the number of examples."""
  _, inverse = np.unique(labels, return_inverse=True)
  counts = np.bincount(inverse)
  sums = np.bincount(inverse, weights=values.astype(np.float64))
  return sums / counts, counts


def country_macro_accuracy(pred: ArrayLike, true: ArrayLike, countries: ArrayLike) -> float:
  """Accuracy computed per country, then averaged with equal weight per country.

  Unlike plain accuracy, countries with many test participants do not dominate the score.
  """
  pred, true = _paired(pred, true)
  countries = np.asarray(countries).ravel()
  if countries.shape != pred.shape:
    raise ValueError(f"length mismatch: {countries.size} countries vs {pred.size} predictions")
  per_country, _ = _group_means(pred == true, countries)
  return float(np.mean(per_country))


def sigma_inequity(
  correct: ArrayLike, groups: Mapping[str, ArrayLike], min_count: int = 5
) -> float:
  """Mean over demographic dimensions of the spread of subgroup accuracies (lower is fairer).

  For each dimension (e.g. "gender" -> per-example labels), the accuracy of every subgroup
  (distinct label) with at least ``min_count`` examples is computed, and the population
  standard deviation (ddof=0) of those accuracies is taken; tiny subgroups are skipped because
  their accuracy is too noisy to measure inequity. Dimensions left with fewer than 2 subgroups
  have no spread and are skipped. Every distinct label is a subgroup, so callers should drop
  or relabel missing values beforehand if they should not form a subgroup.

  Returns NaN if no dimension qualifies.
  """
  correct = np.asarray(correct, dtype=bool).ravel()
  stds = []
  for dimension, labels in groups.items():
    labels = np.asarray(labels).ravel()
    if labels.shape != correct.shape:
      raise ValueError(f"dimension {dimension!r}: {labels.size} labels vs {correct.size} examples")
    accs, counts = _group_means(correct, labels)
    accs = accs[counts >= min_count]
    if accs.size >= 2:
      stds.append(np.std(accs))
  return float(np.mean(stds)) if stds else float("nan")


def _wasserstein_1d(u: np.ndarray, v: np.ndarray) -> float:
  """W1 distance between two empirical distributions: integral of |CDF_u - CDF_v|.

  Both CDFs are step functions that only change at the pooled sample values, so the integral
  is a sum over the gaps between consecutive pooled values (as in scipy.stats).
  """
  u, v = np.sort(u), np.sort(v)
  pooled = np.sort(np.concatenate([u, v]))
  gaps = np.diff(pooled)
  cdf_u = np.searchsorted(u, pooled[:-1], side="right") / u.size
  cdf_v = np.searchsorted(v, pooled[:-1], side="right") / v.size
  return float(np.sum(np.abs(cdf_u - cdf_v) * gaps))


def question_emd(
  true_codes: ArrayLike, pred_codes: ArrayLike, scale_min: float, scale_max: float
) -> float:
  """Earth mover's distance between the true and predicted answer distributions of a question.

  Both samples of answer codes are min-max normalised to [0, 1] with the question's answer
  scale (``(code - scale_min) / (scale_max - scale_min)``), so EMDs of questions with
  different scales are comparable and lie in [0, 1] for in-scale codes. The distance has
  ``scipy.stats.wasserstein_distance`` semantics (unweighted samples; their sizes may differ),
  as in WorldValuesBench's own evaluation.
  """
  if not scale_max > scale_min:
    raise ValueError(f"answer scale needs max > min, got [{scale_min}, {scale_max}]")
  true = np.asarray(true_codes, dtype=np.float64).ravel()
  pred = np.asarray(pred_codes, dtype=np.float64).ravel()
  if true.size == 0 or pred.size == 0:
    raise ValueError("question_emd needs at least one true and one predicted code")
  span = scale_max - scale_min
  return _wasserstein_1d((true - scale_min) / span, (pred - scale_min) / span)


def emd_by_question(
  question_ids: ArrayLike,
  true_codes: ArrayLike,
  pred_codes: ArrayLike,
  scales: Mapping[Hashable, tuple[float, float]],
) -> dict[Hashable, float]:
  """:func:`question_emd` of every question, keyed by question id in order of first appearance.

  ``scales`` maps each question id to its (answer_scale_min, answer_scale_max) from
  WorldValuesBench's question_metadata.json; a question without a scale raises KeyError.
  """
  qids = np.asarray(question_ids).ravel()
  true, pred = _paired(true_codes, pred_codes)
  if qids.shape != true.shape:
    raise ValueError(f"length mismatch: {qids.size} question ids vs {true.size} codes")
  result = {}
  for qid, rows in _group_rows(qids):
    if qid not in scales:
      raise KeyError(f"no answer scale for question {qid!r}")
    lo, hi = scales[qid]
    result[qid] = question_emd(true[rows], pred[rows], lo, hi)
  return result


# The released evaluation's AUC thresholds, built as it builds them (0, 0.05, ..., 0.6).
RELEASED_AUC_THRESHOLDS = np.arange(0.0, 0.6 + 1e-8, 0.05)


def emd_summary(emds: Mapping[Hashable, float] | ArrayLike) -> dict[str, float]:
  """Mean, median and two AUCs of per-question EMDs (a dict from :func:`emd_by_question`).

  Both AUCs are areas under F(t), the share of questions with EMD <= t; higher is better.

  - ``auc``: F as a fraction, t over [0, 1], integrated exactly: one question contributes the
    integral of the indicator [e <= t] over t in [0, 1], i.e. 1 - clip(e, 0, 1), so
    ``auc = mean(1 - clip(emd, 0, 1))``, which equals ``1 - mean`` whenever all EMDs lie in
    [0, 1] (always the case for in-scale codes).
  - ``auc_released``: as the released evaluation computes it: F in percent at the thresholds
    :data:`RELEASED_AUC_THRESHOLDS`, integrated with the trapezoid rule; in [0, 60].
  """
  values = np.asarray(list(emds.values()) if isinstance(emds, Mapping) else emds, np.float64)
  if values.size == 0:
    raise ValueError("emd_summary needs at least one EMD")
  return {
    "mean": float(np.mean(values)),
    "median": float(np.median(values)),
    "auc": float(np.mean(1.0 - np.clip(values, 0.0, 1.0))),
    "auc_released": float(
      np.trapezoid(
        [np.mean(values <= t) * 100.0 for t in RELEASED_AUC_THRESHOLDS], RELEASED_AUC_THRESHOLDS
      )
    ),
  }


def _entropy_nats(labels: np.ndarray) -> float:
  """Shannon entropy (nats) of the empirical distribution of ``labels``."""
  _, counts = np.unique(labels, return_counts=True)
  p = counts / counts.sum()
  return float(-np.sum(p * np.log(p)))


def prediction_entropy(question_ids: ArrayLike, preds: ArrayLike) -> float:
  """Entropy (nats) of each question's predicted-option distribution, averaged over questions.

  A mean-collapsed model answers every participant of a question with the same option
  (entropy 0); the entropy of the true answers computed the same way is the target. Options
  never predicted have probability 0 and contribute nothing, so the number of options is not
  needed. ``preds`` may be letters or option indices.
  """
  qids, preds = _paired(question_ids, preds)
  return float(np.mean([_entropy_nats(preds[rows]) for _, rows in _group_rows(qids)]))


def profile_diversity(question_ids: ArrayLike, profile_ids: ArrayLike, preds: ArrayLike) -> float:
  """Mean over questions of the number of distinct predictions across demographic profiles.

  For each question answered under at least 2 distinct profiles, count the distinct predicted
  options over its examples; 1.0 means every profile gets the same answer (full mean
  collapse), larger values mean the model differentiates profiles. Questions seen with a
  single profile cannot show diversity and are skipped; returns NaN if none remain.
  """
  qids, preds = _paired(question_ids, preds)
  profiles = np.asarray(profile_ids).ravel()
  if profiles.shape != qids.shape:
    raise ValueError(f"length mismatch: {profiles.size} profile ids vs {qids.size} examples")
  distinct = [
    np.unique(preds[rows]).size
    for _, rows in _group_rows(qids)
    if np.unique(profiles[rows]).size >= 2
  ]
  return float(np.mean(distinct)) if distinct else float("nan")


def distinct_n(texts: Sequence[str], n: int) -> float:
  """Distinct-n: unique n-grams / total n-grams over the whole corpus (whitespace tokens).

  n-grams do not cross text boundaries; texts shorter than n tokens contribute none.
  Returns 0.0 for a corpus without any n-gram.
  """
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  ngrams = [
    tuple(tokens[i : i + n])
    for tokens in (text.split() for text in texts)
    for i in range(len(tokens) - n + 1)
  ]
  return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def write_emd_input(
  path: str | os.PathLike,
  question_ids: Sequence[str],
  participant_ids: Sequence[int],
  scores: Sequence[int],
) -> None:
  """Write predictions in the input format of WorldValuesBench's ``evaluation/evaluate.py``.

  Tab-separated with the header ``QUESTION_ID``, ``PARTICIPANT_ID`` (the WVS ``D_INTERVIEW``
  id, used by the tool to look up the true answer) and ``SCORE`` (the predicted answer code,
  written as an integer because the tool casts scores to int). Run the tool with
  ``--input-file-separator $'\\t'``, since it reads comma-separated files by default.
  """
  if not len(question_ids) == len(participant_ids) == len(scores):
    raise ValueError(
      f"length mismatch: {len(question_ids)} question ids, "
      f"{len(participant_ids)} participant ids, {len(scores)} scores"
    )
  with open(path, "w", newline="") as f:
    writer = csv.writer(f, delimiter="\t", lineterminator="\n")
    writer.writerow(["QUESTION_ID", "PARTICIPANT_ID", "SCORE"])
    for qid, pid, score in zip(question_ids, participant_ids, scores, strict=True):
      writer.writerow([str(qid), int(pid), int(score)])


class Summary(TypedDict):
  """:func:`summarize`'s metrics: floats, and each question's EMD for cumulative curves."""

  accuracy: float
  macro_f1: float
  country_macro_accuracy: float
  sigma_inequity: float
  emd_mean: float
  emd_median: float
  emd_auc: float
  emd_auc_released: float
  entropy_pred: float
  entropy_true: float
  profile_diversity: float
  num_examples: float
  num_questions: float
  emd_by_question: dict[str, float]


def summarize(
  pred_letters: ArrayLike,
  true_letters: ArrayLike,
  pred_codes: ArrayLike,
  true_codes: ArrayLike,
  question_ids: ArrayLike,
  countries: ArrayLike,
  profile_fields: Mapping[str, ArrayLike],
  scales: Mapping[Hashable, tuple[float, float]],
  min_count: int = 5,
) -> Summary:
  """All main WVB metrics of one evaluation run, from per-example arrays.

  ``profile_fields`` maps each sigma-inequity dimension (country, age, gender, ...) to
  per-example labels; with ``countries`` they identify the profile for
  :func:`profile_diversity`. ``scales`` maps question id -> (min, max) answer scale.
  The keys are :class:`Summary`'s; emd_by_question maps question id -> EMD.
  """
  pred_letters, true_letters = _paired(pred_letters, true_letters)
  # One integer id per distinct (country, *profile fields) combination, built column by column
  # and re-compacted after each so that ids stay below the number of examples (no overflow).
  profile_ids = np.zeros(pred_letters.size, np.int64)
  for column in [countries, *profile_fields.values()]:
    values, codes = np.unique(np.asarray(column).ravel(), return_inverse=True)
    profile_ids = np.unique(profile_ids * values.size + codes, return_inverse=True)[1]
  emds = emd_by_question(question_ids, true_codes, pred_codes, scales)
  emd = emd_summary(emds)
  return {
    "accuracy": accuracy(pred_letters, true_letters),
    "macro_f1": macro_f1(pred_letters, true_letters),
    "country_macro_accuracy": country_macro_accuracy(pred_letters, true_letters, countries),
    "sigma_inequity": sigma_inequity(pred_letters == true_letters, profile_fields, min_count),
    "emd_mean": emd["mean"],
    "emd_median": emd["median"],
    "emd_auc": emd["auc"],
    "emd_auc_released": emd["auc_released"],
    "entropy_pred": prediction_entropy(question_ids, pred_letters),
    "entropy_true": prediction_entropy(question_ids, true_letters),
    "profile_diversity": profile_diversity(question_ids, profile_ids, pred_letters),
    "num_examples": float(pred_letters.size),
    "num_questions": float(len(emds)),
    "emd_by_question": {str(q): float(v) for q, v in emds.items()},
  }
