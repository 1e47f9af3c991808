"""Evaluation of a model on a survey split: restricted-argmax answers and their metrics."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cuma_jax import schema
from cuma_jax.data import prompts
from cuma_jax.data.pipeline import as_text, make_dataset
from cuma_jax.evaluation import metrics, predict
from cuma_jax.models.pretrained import abstract_params
from cuma_jax.sharding import Layout
from cuma_jax.training.step import demographics_for, make_eval_step

# What the evaluation step reads of a batch.
EVAL_KEYS = ("input_ids", "attention_mask", "prompt_length", "profile_index", "option_count")


def evaluate(
  config: schema.Config,
  module,
  params,
  tokenizer,
  source,
  demographics,
  oracle=None,
  *,
  split: str = "the split",
) -> dict:
  """Restricted-argmax predictions on one split and their metrics (plus the oracle's).

  Refuses (:class:`~cuma_jax.evaluation.predict.NonFiniteLogits`, naming ``split`` and the
  count) when any example's option logits are not finite.
  """
  dataset, tables = make_dataset(
    source,
    tokenizer,
    max_length=config.data.max_length,
    batch_size=config.eval.batch_size,
    shuffle=False,
    num_epochs=1,
    drop_remainder=False,
    demographic_system_prompt=config.data.demographic_system_prompt,
    supervision=config.data.supervision,
    shard_index=0,
    shard_count=1,
  )
  table = None if demographics is None else jnp.asarray(demographics.encode(tables.profiles))
  letter_ids = tuple(predict.letter_token_ids(tokenizer, prompts.LETTERS))
  layout = Layout.of(config.mesh)
  jitted, param_sh = sharded_choice(module, layout, letter_ids)
  params = jax.device_put(params, param_sh)
  options, nonfinite, indices = [], [], []

  def read(chosen, bad, rows):
    options.append(np.asarray(chosen)[:rows])
    nonfinite.append(np.asarray(bad)[:rows])

  unread = None  # The previous batch's options, read after the next batch is dispatched.
  for batch in dataset:
    padded = {
      k: layout.global_batch(_pad_rows(np.asarray(batch[k]), config.eval.batch_size))
      for k in EVAL_KEYS
    }
    with layout.active():
      chosen, bad = jitted(params, table, padded)
    if unread is not None:
      read(*unread)
    unread = (chosen, bad, len(batch["input_ids"]))
    indices.append(batch["example_index"])
  if unread is not None:
    read(*unread)
  bad_rows = np.concatenate(nonfinite)
  predict.refuse_nonfinite(int(bad_rows.sum()), len(bad_rows), f"split {split!r}")
  return score_predictions(
    source,
    np.concatenate(options),
    np.concatenate(indices),
    oracle,
    inequity_includes_country=config.eval.inequity_includes_country,
  )


@functools.lru_cache(maxsize=8)
def sharded_choice(module, layout: Layout, letter_ids: tuple[int, ...]):
  """(jitted (params, table, batch) -> ([B] chosen option, [B] whether its option logits
  were not finite), the parameters' shardings);
  one per model, layout and letters, so evaluating again compiles nothing.

  Under the training layout: parameters where training keeps them, the batch split over
  the data axes; only the chosen options come back, to every process.
  """
  eval_step = make_eval_step(module)
  letters = jnp.asarray(letter_ids)
  param_sh = layout.param_shardings(abstract_params(module))

  def choose(params, table, batch):
    last_logits = eval_step(params, batch, demographics_for(table, batch))
    option_ids = jnp.broadcast_to(letters, (len(last_logits), len(letters)))
    option_mask = jnp.arange(len(letters))[None] < batch["option_count"][:, None]
    return (
      predict.restricted_argmax(last_logits, option_ids, option_mask),
      predict.nonfinite_rows(last_logits, option_ids, option_mask),
    )

  with layout.active():
    jitted = jax.jit(
      choose,
      in_shardings=(param_sh, layout.replicated, layout.batch),
      out_shardings=layout.replicated,
    )
  return jitted, param_sh


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
  if len(array) == rows:
    return array
  pad = np.repeat(array[-1:], rows - len(array), axis=0)
  return np.concatenate([array, pad])


def score_predictions(
  source, chosen_options, example_indices, oracle=None, *, inequity_includes_country: bool
) -> dict:
  """Metrics of predicted option indices; with an oracle also its two reference predictors.

  sigma-inequity runs over every profile field, or over all but country when
  ``inequity_includes_country`` is False (docs/evaluation.md#inequity).
  """
  indices = [int(i) for i in example_indices]
  # Data sources read many records at once faster (plain lists have no __getitems__).
  records = (
    source.__getitems__(indices)
    if hasattr(source, "__getitems__")
    else [source[i] for i in indices]
  )
  qids = np.array([as_text(r["question_id"]) for r in records])
  codes = [np.asarray(r["option_codes"]) for r in records]
  true_option = np.array([int(r["answer_option"]) for r in records])
  scales = {
    q["question_id"]: (q["scale_min"], q["scale_max"])
    for q in source.dataset_info.metadata["questions"]
  }
  for qid, c in zip(qids, codes, strict=True):
    if scales.get(qid, (None, None))[0] is None:
      scales[qid] = (min(c), max(c))  # Non-ordinal questions: the option codes' range.
  demographics = {
    f: np.array([as_text(r["demographics"][f]) for r in records]) for f in prompts.PROFILE_FIELDS
  }
  inequity_fields = {
    f: labels for f, labels in demographics.items() if inequity_includes_country or f != "country"
  }

  def summary(options):
    return metrics.summarize(
      pred_letters=np.array([prompts.LETTERS[o] for o in options]),
      true_letters=np.array([prompts.LETTERS[o] for o in true_option]),
      pred_codes=np.array([c[o] for c, o in zip(codes, options, strict=True)]),
      true_codes=np.array([c[o] for c, o in zip(codes, true_option, strict=True)]),
      question_ids=qids,
      countries=demographics["country"],
      profile_fields=inequity_fields,
      scales=scales,
    )

  result = {"model": summary(chosen_options)}
  if oracle is not None:
    profiles = [as_text(r["profile"]) for r in records]
    result["optimum"] = summary(
      [oracle.optimal_option(p, q) for p, q in zip(profiles, qids, strict=True)]
    )
    result["population_mean"] = summary([oracle.population_option(q) for q in qids])
  return result
