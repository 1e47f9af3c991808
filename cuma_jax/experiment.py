"""One experiment end to end: data, backbone, demographic table, training, evaluation.

Everything :mod:`cuma_jax.main` does is importable here, so a notebook can call
:func:`run` with a config from ``configs/`` (or any :func:`presets.experiment_config`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from cuma_jax import api, presets
from cuma_jax.data import builders, prompts, synthetic
from cuma_jax.data.pipeline import SurveyTables, as_text, make_dataset
from cuma_jax.evaluation import metrics, predict
from cuma_jax.models.config import ModelConfig
from cuma_jax.models.demographic import DemographicEncoder, PrecomputedEncoder
from cuma_jax.training import checkpointing, loop
from cuma_jax.training.partition import merge_params, split_params
from cuma_jax.training.step import demographics_for, make_eval_step


@dataclasses.dataclass
class SurveyData:
  sources: dict[str, Any]  # split -> tfds data source
  eval_splits: tuple[str, ...]
  oracle: synthetic.SurveyOracle | None


def load_data(config, workdir: str) -> SurveyData:
  """Prepares (once) and opens the TFDS array_record dataset the config names."""
  data_dir = config.data.data_dir or os.path.join(workdir, "tfds")
  if config.data.dataset == "synthetic":
    survey = synthetic.SyntheticSurveyConfig(**config.data.synthetic.to_dict())
    # A config name per survey setting, so a changed size never reuses stale files.
    digest = hashlib.sha1(json.dumps(dataclasses.asdict(survey), sort_keys=True).encode())
    name = "s" + digest.hexdigest()[:12]
    builder = builders.CumaSyntheticSurvey(
      data_dir=data_dir, config=builders.SyntheticConfig(name=name, survey=survey)
    )
    builder.download_and_prepare()
    sources = builder.as_data_source()
    eval_splits = ("test", "zero_shot")
    oracle = builders.load_oracle(sources["test"])
  else:
    if not config.data.manual_dir or not os.path.isdir(config.data.manual_dir):
      raise FileNotFoundError(
        f"config.data.manual_dir={config.data.manual_dir!r} is not a directory; point it at "
        "the WorldValuesBench root (see wvb-format in the README)"
      )
    sources = tfds.data_source(
      f"cuma_world_values_bench/{config.data.builder_config}",
      data_dir=data_dir,
      download_and_prepare_kwargs={
        "download_config": tfds.download.DownloadConfig(manual_dir=config.data.manual_dir)
      },
    )
    eval_splits = tuple(s for s in config.eval.splits if s in sources)
    oracle = None
  for split, source in sources.items():
    if len(source) == 0:
      raise ValueError(f"dataset split {split!r} has no valid rows")
  return SurveyData(sources=dict(sources), eval_splits=eval_splits, oracle=oracle)


@dataclasses.dataclass
class Demographics:
  """Profile strings -> router inputs: the encoder, optionally standardised with the
  training profiles' per-dimension mean and std (``encoder.standardize``)."""

  encoder: DemographicEncoder | PrecomputedEncoder
  mean: np.ndarray | float = 0.0
  std: np.ndarray | float = 1.0

  def table(self, tables: SurveyTables) -> np.ndarray:
    """[num_profiles, d] for a split's sorted distinct profiles."""
    return (self.encoder.encode(list(tables.profiles)) - self.mean) / self.std


def demographic_table(demographics: Demographics | None, tables: SurveyTables):
  return None if demographics is None else demographics.table(tables)


def make_demographics(
  config, backbone_dir: str, train_tables: SurveyTables | None = None
) -> Demographics | None:
  """The router's demographic inputs (None when the routers do not read them)."""
  adapter = presets.adapter_config(config)
  if adapter is None or not adapter.uses_demographics:
    return None
  if config.encoder.precomputed:
    path = config.encoder.precomputed
    encoder = PrecomputedEncoder(path)
    width = encoder.dim
  else:
    path = config.encoder.checkpoint or backbone_dir
    width = ModelConfig.from_pretrained(path).hidden_size  # Before loading a large model.
  if width != adapter.demographic_dim:
    raise ValueError(
      f"the demographic encoder at {path} gives vectors of width {width}, "
      f"but config.adapter.demographic_dim={adapter.demographic_dim}; set "
      "config.encoder.checkpoint (e.g. Qwen3-Embedding-0.6B)"
    )
  if not config.encoder.precomputed:
    encoder = DemographicEncoder.from_pretrained(
      path, pooling=config.encoder.pooling, max_length=config.encoder.max_length
    )
  demographics = Demographics(encoder)
  if config.encoder.standardize:
    if train_tables is None:
      raise ValueError("encoder.standardize needs the training profiles")
    train = encoder.encode(list(train_tables.profiles))
    demographics = Demographics(encoder, train.mean(0), train.std(0) + 1e-6)
  return demographics


def evaluate(config, module, params, tokenizer, source, demographics, oracle=None) -> dict:
  """Restricted-argmax predictions on one split and their metrics (plus the oracle's)."""
  dataset, tables = make_dataset(
    source,
    tokenizer,
    max_length=config.data.max_length,
    batch_size=config.eval.batch_size,
    shuffle=False,
    num_epochs=1,
    drop_remainder=False,
    demographic_system_prompt=config.data.demographic_system_prompt,
    shard_index=0,
    shard_count=1,
  )
  table = demographic_table(demographics, tables)
  table = None if table is None else jnp.asarray(table)
  letter_ids = np.asarray(predict.letter_token_ids(tokenizer, prompts.LETTERS))
  eval_step = jax.jit(make_eval_step(module))
  options, indices = [], []
  for batch in dataset:
    n = len(batch["input_ids"])
    padded = {k: _pad_rows(np.asarray(v), config.eval.batch_size) for k, v in batch.items()}
    z = demographics_for(table, padded)
    last_logits = eval_step(
      params, {k: padded[k] for k in ("input_ids", "attention_mask", "prompt_length")}, z
    )
    option_ids = np.broadcast_to(letter_ids, (len(last_logits), len(letter_ids)))
    option_mask = np.arange(len(letter_ids))[None] < padded["option_count"][:, None]
    chosen = np.asarray(predict.restricted_argmax(last_logits, option_ids, option_mask))
    options.append(chosen[:n])
    indices.append(batch["example_index"])
  return score_predictions(source, np.concatenate(options), np.concatenate(indices), oracle)


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
  if len(array) == rows:
    return array
  pad = np.repeat(array[-1:], rows - len(array), axis=0)
  return np.concatenate([array, pad])


def score_predictions(source, chosen_options, example_indices, oracle=None) -> dict:
  """Metrics of predicted option indices; with an oracle also its two reference predictors."""
  records = [source[int(i)] for i in example_indices]
  qids = np.array([as_text(r["question_id"]) for r in records])
  codes = [np.asarray(r["option_codes"]) for r in records]
  true_option = np.array([int(r["answer_option"]) for r in records])
  scales = {
    q["question_id"]: (q["scale_min"], q["scale_max"])
    for q in source.dataset_info.metadata["questions"]
  }
  for qid, c in zip(qids, codes):
    if scales.get(qid, (None, None))[0] is None:
      scales[qid] = (min(c), max(c))  # Non-ordinal questions: the option codes' range.
  fields = {
    f: np.array([as_text(r["demographics"][f]) for r in records])
    for f in prompts.PROFILE_FIELDS
    if f != "country"
  }
  countries = np.array([as_text(r["demographics"]["country"]) for r in records])

  def summary(options):
    return metrics.summarize(
      pred_letters=np.array([prompts.LETTERS[o] for o in options]),
      true_letters=np.array([prompts.LETTERS[o] for o in true_option]),
      pred_codes=np.array([c[o] for c, o in zip(codes, options)]),
      true_codes=np.array([c[o] for c, o in zip(codes, true_option)]),
      question_ids=qids,
      countries=countries,
      profile_fields=fields,
      scales=scales,
    )

  result = {"model": summary(chosen_options)}
  if oracle is not None:
    profiles = [as_text(r["profile"]) for r in records]
    result["optimum"] = summary([oracle.optimal_option(p, q) for p, q in zip(profiles, qids)])
    result["population_mean"] = summary([oracle.population_option(q) for q in qids])
  return result


def build_tiny_backbone(config, workdir: str, data: SurveyData, log=print) -> str:
  """The embedded default's backbone: a tiny Qwen3 given general competence locally.

  A random tiny Qwen3 and a BPE tokenizer are built from the survey's text, then fully
  fine-tuned for ``tiny_backbone.warmup_steps`` on the survey WITHOUT profiles in the prompt:
  it learns the answer format and the population's answers (mean collapse), which is the
  "base model" CuMA then specialises per culture.  Cached in ``workdir/backbone``.
  """
  from cuma_jax import tiny, tiny_backbone

  final = os.path.join(workdir, "backbone")
  if tiny_backbone.is_checkpoint(final):
    return final
  random_dir = os.path.join(workdir, "backbone_random")
  if not tiny_backbone.is_checkpoint(random_dir):
    train = data.sources["train"]
    corpus = _survey_corpus(train)
    tokenizer = tiny.build_tiny_tokenizer(
      corpus, random_dir, vocab_size=config.tiny_backbone.vocab_size
    )
    tiny_backbone.write_random_qwen3(
      random_dir,
      tokenizer,
      seed=config.seed,
      hidden_size=config.tiny_backbone.hidden_size,
      num_hidden_layers=config.tiny_backbone.num_layers,
      intermediate_size=2 * config.tiny_backbone.hidden_size,
    )
  warm = presets.warmup_config(config)
  log(
    f"warm-up: full fine-tuning of the tiny backbone for {warm.train.num_steps} steps "
    "on the survey without profiles"
  )
  module, params = api.load_pretrained(random_dir)
  tokenizer = api.load_tokenizer(random_dir)
  dataset, _ = make_dataset(
    data.sources["train"],
    tokenizer,
    max_length=warm.data.max_length,
    batch_size=warm.data.batch_size,
    seed=warm.data.shuffle_seed,
    num_epochs=None,
    demographic_system_prompt=False,
  )
  result = loop.train(
    warm,
    os.path.join(workdir, "warmup"),
    module,
    params,
    dataset,
    num_steps=warm.train.num_steps,
    log=log,
  )
  api.save_pretrained(module, merge_params(result.trainable, result.frozen), final + ".tmp")
  tokenizer.save_pretrained(final + ".tmp")
  os.replace(final + ".tmp", final)
  return final


def _survey_corpus(source):
  """Every text the prompts are made of: questions/options, profiles, system prompts."""
  for question in source.dataset_info.metadata["questions"]:
    yield question["text"] + " " + " ".join(question["option_texts"])
  for profile in SurveyTables.of(source).profiles:
    yield profile
  yield prompts.DEFAULT_SYSTEM_PROMPT
  yield prompts.INSTRUCTION


def run(config, workdir: str, log=print) -> dict:
  """Trains (``config.mode == 'train'``) and/or evaluates; returns the metrics it printed."""
  presets.validate(config)
  os.makedirs(workdir, exist_ok=True)
  data = load_data(config, workdir)
  backbone_dir = config.model.checkpoint or build_tiny_backbone(
    config, os.path.join(workdir, "assets"), data, log
  )
  adapter = presets.adapter_config(config)
  dtype = jnp.dtype(config.model.dtype)
  module, params = api.load_pretrained(
    backbone_dir,
    dtype=dtype,
    param_dtype=jnp.dtype(config.model.param_dtype),
    scan_layers=config.model.scan_layers,
    remat=config.model.remat,
    adapter=adapter,
    rng=jax.random.PRNGKey(config.seed),
  )
  tokenizer = api.load_tokenizer(backbone_dir)
  train_tables = SurveyTables.of(data.sources["train"])
  demographics = make_demographics(config, backbone_dir, train_tables)
  results = {}
  train_dir = os.path.join(workdir, "train")
  if config.mode == "train":
    results["untrained"] = _evaluate_all(config, module, params, tokenizer, data, demographics)
    _report("untrained", results["untrained"], log)
    dataset, _ = make_dataset(
      data.sources["train"],
      tokenizer,
      max_length=config.data.max_length,
      batch_size=config.data.batch_size,
      seed=config.data.shuffle_seed,
      num_epochs=None,
      demographic_system_prompt=config.data.demographic_system_prompt,
      tables=train_tables,
    )
    steps = loop.total_steps(config, len(data.sources["train"]))
    result = loop.train(
      config,
      train_dir,
      module,
      params,
      dataset,
      num_steps=steps,
      demographic_table=demographic_table(demographics, train_tables),
      log=log,
    )
    trainable, frozen = result.trainable, result.frozen
    if adapter is not None:
      exported = dict(dataclasses.asdict(adapter), param_dtype=jnp.dtype(adapter.param_dtype).name)
      checkpointing.export_adapters(trainable, exported, os.path.join(workdir, "adapters"))
  else:
    trainable, frozen = _restore_trainable(config, train_dir, module, params)
  params = merge_params(trainable, frozen)
  results["trained"] = _evaluate_all(config, module, params, tokenizer, data, demographics)
  _report("trained", results["trained"], log)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results


def _evaluate_all(config, module, params, tokenizer, data, demographics):
  return {
    split: evaluate(
      config, module, params, tokenizer, data.sources[split], demographics, data.oracle
    )
    for split in data.eval_splits
  }


def _restore_trainable(config, train_dir, module, params):
  """mode=eval: the latest training checkpoint's trainable parameters."""
  trainable, frozen = split_params(
    params, config.trainable, frozen_dtype=jnp.dtype(config.model.param_dtype)
  )
  ckpt = checkpointing.TrainCheckpoints(
    os.path.join(train_dir, "checkpoints"),
    save_every=1,
    keep=1,
    config_json=checkpointing.config_to_json(config),
  )
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"mode=eval needs a training checkpoint in {train_dir}/checkpoints")
  state, _ = ckpt.restore(step, loop.abstract_state(config, trainable))
  ckpt.close()
  return state["trainable"], frozen


def _report(name, results, log):
  for split, by_predictor in results.items():
    for predictor, m in by_predictor.items():
      label = name if predictor == "model" else predictor
      log(
        f"[{split}] {label:>16}: accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  "
        f"EMD {m['emd_mean']:.4f}  diversity {m['profile_diversity']:.2f}"
      )
