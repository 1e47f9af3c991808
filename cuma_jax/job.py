"""One experiment end to end: data, backbone, demographic table, training, evaluation.

Everything :mod:`cuma_jax.main` does is importable here, so a notebook can call
:func:`run` with a config from ``configs/`` (or any :func:`presets.experiment_config`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from cuma_jax import presets
from cuma_jax.data import builders, synthetic
from cuma_jax.data.pipeline import SurveyTables, make_dataset
from cuma_jax.encoders import DemographicEncoder, Demographics, PrecomputedEncoder
from cuma_jax.evaluation.survey import evaluate
from cuma_jax.models.config import ModelConfig
from cuma_jax.models.pretrained import load_pretrained, load_tokenizer
from cuma_jax.params import merge_params, split_params
from cuma_jax.tiny import backbone as tiny_backbone
from cuma_jax.training import checkpointing, loop
from cuma_jax.training.workdir import WorkdirLock, write_atomically


@dataclasses.dataclass
class SurveyData:
  sources: dict[str, Any]  # split -> tfds data source
  eval_splits: tuple[str, ...]
  oracle: synthetic.SurveyOracle | None
  directory: str  # The prepared dataset's files.


def load_data(config, workdir: str, log=print) -> SurveyData:
  """Opens the TFDS array_record dataset the config names, prepared once per input contents."""
  data_dir = config.data.data_dir or os.path.join(workdir, "tfds")
  builder = builders.prepared_builder(config.data, data_dir, log)
  sources = builder.as_data_source()
  if config.data.dataset == "synthetic":
    eval_splits = ("test", "zero_shot")
    oracle = builders.load_oracle(sources["test"])
  else:
    eval_splits = tuple(s for s in config.eval.splits if s in sources)
    oracle = None
  for split, source in sources.items():
    if len(source) == 0:
      raise ValueError(f"dataset split {split!r} has no valid rows")
  return SurveyData(
    sources=dict(sources), eval_splits=eval_splits, oracle=oracle, directory=str(builder.data_dir)
  )


def demographic_table(demographics: Demographics | None, tables: SurveyTables):
  """[num_profiles, d] router inputs of a split's sorted distinct profiles (or None)."""
  return None if demographics is None else demographics.encode(tables.profiles)


def encoder_path(config, backbone_dir: str) -> str | None:
  """The demographic encoder's checkpoint or .npz (None when the routers read no profiles)."""
  adapter = presets.adapter_config(config)
  if adapter is None or not adapter.uses_demographics:
    return None
  return config.encoder.precomputed or config.encoder.checkpoint or backbone_dir


def make_demographics(
  config, backbone_dir: str, train_tables: SurveyTables | None = None
) -> Demographics | None:
  """The router's demographic inputs (None when the routers do not read them)."""
  path = encoder_path(config, backbone_dir)
  if path is None:
    return None
  adapter = presets.adapter_config(config)
  if config.encoder.precomputed:
    encoder = PrecomputedEncoder(path)
    width = encoder.dim
  else:
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
  if not config.encoder.standardize:
    return Demographics(encoder)
  if train_tables is None:
    raise ValueError("encoder.standardize needs the training profiles")
  return Demographics.standardized(encoder, train_tables.profiles)


def run(config, workdir: str, log=print) -> dict:
  """Trains (``config.mode == 'train'``) and/or evaluates; returns the metrics it printed.

  The cheap checks come first and write nothing: the config, the workdir's checkpoints being
  of it, and for mode=eval their existence. The workdir is then locked for the rest of the run.
  """
  presets.validate(config)
  checkpoints = os.path.join(workdir, "train", "checkpoints")
  if checkpointing.check_workdir(config, checkpoints) is None and config.mode == "eval":
    raise FileNotFoundError(f"mode=eval needs a readable training checkpoint in {checkpoints}")
  with WorkdirLock(workdir, enabled=jax.process_index() == 0, log=log):
    return _run(config, workdir, log)


def _run(config, workdir: str, log) -> dict:
  data = load_data(config, workdir, log)
  backbone_dir = config.model.checkpoint or tiny_backbone.build_warmed_up(
    config, os.path.join(workdir, "assets"), data, log
  )
  inputs = checkpointing.input_fingerprints(
    backbone=backbone_dir, encoder=encoder_path(config, backbone_dir), dataset=data.directory
  )
  train_dir = os.path.join(workdir, "train")
  checkpointing.check_workdir(config, os.path.join(train_dir, "checkpoints"), inputs)
  adapter = presets.adapter_config(config)
  dtype = jnp.dtype(config.model.dtype)
  module, params = load_pretrained(
    backbone_dir,
    dtype=dtype,
    param_dtype=jnp.dtype(config.model.param_dtype),
    scan_layers=config.model.scan_layers,
    remat=config.model.remat,
    adapter=adapter,
    rng=jax.random.PRNGKey(config.seed),
  )
  tokenizer = load_tokenizer(backbone_dir)
  train_tables = SurveyTables.of(data.sources["train"])
  demographics = make_demographics(config, backbone_dir, train_tables)
  results = {}
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
      inputs=inputs,
      log=log,
    )
    trainable, frozen = result.trainable, result.frozen
    if adapter is not None:
      exported = dict(dataclasses.asdict(adapter), param_dtype=jnp.dtype(adapter.param_dtype).name)
      checkpointing.export_adapters(trainable, exported, os.path.join(workdir, "adapters"))
  else:
    trainable, frozen = _restore_trainable(config, train_dir, module, params, inputs, log)
  params = merge_params(trainable, frozen)
  results["trained"] = _evaluate_all(config, module, params, tokenizer, data, demographics)
  _report("trained", results["trained"], log)
  write_atomically(os.path.join(workdir, "results.json"), json.dumps(results, indent=2))
  return results


def _evaluate_all(config, module, params, tokenizer, data, demographics):
  return {
    split: evaluate(
      config, module, params, tokenizer, data.sources[split], demographics, data.oracle
    )
    for split in data.eval_splits
  }


def _restore_trainable(config, train_dir, module, params, inputs, log):
  """mode=eval: the newest readable training checkpoint's trainable parameters."""
  trainable, frozen = split_params(
    params, config.trainable, frozen_dtype=jnp.dtype(config.model.param_dtype)
  )
  ckpt = checkpointing.TrainCheckpoints.of(
    config, os.path.join(train_dir, "checkpoints"), inputs=inputs, log=log
  )
  _, state, _ = ckpt.restore_latest(loop.abstract_state(config, trainable))
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
