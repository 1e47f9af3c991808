"""One experiment end to end: data, backbone, demographic table, training, evaluation.

Everything :mod:`cuma_jax.main` does is importable here: :func:`run` trains and evaluates
what a config describes; :func:`restore` gives a trained workdir back as an
:class:`Experiment` (model, parameters, tokenizer, data, demographics) for analysis.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections

from cuma_jax import errors, overrides, presets, schema
from cuma_jax.checkpoints import adapter_import
from cuma_jax.data import builders, chat, synthetic
from cuma_jax.data.pipeline import SurveyTables, as_text, make_dataset
from cuma_jax.encoders import (
  DemographicEncoder,
  Demographics,
  FittedNgramEncoder,
  PrecomputedEncoder,
)
from cuma_jax.evaluation.survey import evaluate
from cuma_jax.models.config import ModelConfig
from cuma_jax.models.pretrained import (
  abstract_params,
  build_decoder,
  load_pretrained,
  load_tokenizer,
)
from cuma_jax.params import merge_params, split_params
from cuma_jax.sharding import Layout, indivisible
from cuma_jax.tiny import backbone as tiny_backbone
from cuma_jax.training import checkpointing, loop
from cuma_jax.training.workdir import WorkdirLock, check_workdir_path, write_atomically


@dataclasses.dataclass
class SurveyData:
  sources: dict[str, Any]  # split -> tfds data source
  oracle: synthetic.SurveyOracle | None
  directory: str  # the prepared dataset's files


def process_zero_first(name: str, make):
  """``make()`` on process 0, then on the others once it is done (they reuse what process 0
  wrote, e.g. a prepared dataset); in a single-process run just ``make()``."""
  if jax.process_count() == 1:
    return make()
  result = make() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(name)
  return result if jax.process_index() == 0 else make()


def load_data(config, workdir: str, log=print) -> SurveyData:
  """Opens the TFDS array_record dataset the config names, prepared once per input contents."""
  data_dir = config.data.data_dir or os.path.join(workdir, "tfds")
  builder = process_zero_first(
    "prepare the dataset", lambda: builders.prepared_builder(config.data, data_dir, log)
  )
  sources = builder.as_data_source()
  oracle = builders.load_oracle(sources["test"]) if config.data.dataset == "synthetic" else None
  for split, source in sources.items():
    if len(source) == 0:
      raise ValueError(f"dataset split {split!r} has no valid rows")
  return SurveyData(sources=dict(sources), oracle=oracle, directory=str(builder.data_dir))


def demographic_table(demographics: Demographics | None, tables: SurveyTables):
  """[num_profiles, d] router inputs of a split's sorted distinct profiles (or None)."""
  return None if demographics is None else demographics.encode(tables.profiles)


def _reads_profiles(config) -> bool:
  adapter = schema.adapter_config(config)
  return adapter is not None and adapter.uses_demographics


def encoder_path(config, backbone_dir: str) -> str | None:
  """The demographic encoder's checkpoint or .npz (None when the routers read no profiles,
  or when the encoder is fitted to the dataset, which is fingerprinted on its own)."""
  if not _reads_profiles(config) or config.encoder.kind == "fitted_ngrams":
    return None
  return config.encoder.precomputed or config.encoder.checkpoint or backbone_dir


# (prepared dataset directory, split, width, ridge) -> fitted encoder. A prepared dataset's
# directory is named by its inputs' digest, so the key identifies the fit's inputs; a process
# running many experiments on one dataset (experiments/mean_collapse) fits once.
_FITTED_ENCODERS: dict[tuple, FittedNgramEncoder] = {}


def fit_ngram_encoder(config, train_source) -> FittedNgramEncoder:
  """The n-gram encoder fitted to the training split's answers (``encoder.kind``)."""
  info = getattr(train_source, "dataset_info", None)
  if info is None:  # not a prepared dataset: nothing names its contents
    return _fit_ngram_encoder(config, train_source)
  key = (
    str(info.data_dir),
    str(train_source.split),
    config.adapter.demographic_dim,
    config.encoder.ridge,
  )
  if key not in _FITTED_ENCODERS:
    _FITTED_ENCODERS[key] = _fit_ngram_encoder(config, train_source)
  return _FITTED_ENCODERS[key]


def _fit_ngram_encoder(config, train_source) -> FittedNgramEncoder:
  records = train_source.__getitems__(range(len(train_source)))
  if config.task == "preference":  # the synthetic preference rows know their option
    records = [r for r in records if int(r["chosen_option"]) >= 0]
    option_key = "chosen_option"
  else:
    option_key = "answer_option"
  questions: dict[str, int] = {}
  return FittedNgramEncoder.fit(
    [as_text(r["profile"]) for r in records],
    [questions.setdefault(as_text(r["question_id"]), len(questions)) for r in records],
    [int(r[option_key]) for r in records],
    dim=config.adapter.demographic_dim,
    ridge=config.encoder.ridge,
  )


def train_profiles(config, train_source) -> tuple[str, ...]:
  """The training split's sorted distinct profiles."""
  if config.task == "preference":
    return chat.profile_table(train_source)
  return SurveyTables.of(train_source).profiles


def make_demographics(
  config, backbone_dir: str, train_source, layout: Layout | None = None
) -> Demographics | None:
  """The router's demographic inputs (None when the routers do not read them); a decoder
  encoder is loaded onto ``layout`` when given."""
  if not _reads_profiles(config):
    return None
  profiles = train_profiles(config, train_source)
  if config.encoder.kind == "fitted_ngrams":
    encoder = fit_ngram_encoder(config, train_source)
    if not config.encoder.standardize:
      return Demographics(encoder)
    return Demographics.standardized(encoder, profiles)
  path = encoder_path(config, backbone_dir)
  adapter = schema.adapter_config(config)
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
      path,
      pooling=config.encoder.pooling,
      max_length=config.encoder.max_length,
      layout=layout,
    )
  if not config.encoder.standardize:
    return Demographics(encoder)
  return Demographics.standardized(encoder, profiles)


@dataclasses.dataclass
class Experiment:
  """What a config's run is made of: returned by :func:`prepare` (adapters at their
  initialisation) and :func:`restore` (the trained adapters of a workdir)."""

  config: ml_collections.ConfigDict
  workdir: str
  data: SurveyData
  backbone_dir: str
  module: Any  # cuma_jax.models.decoder.Decoder
  params: dict
  tokenizer: Any
  demographics: Demographics | None
  train_tables: SurveyTables
  inputs: dict  # fingerprints of the backbone, encoder and prepared dataset

  def evaluate(self, split: str) -> dict:
    """Metrics of this model (and, on the synthetic survey, its reference predictors)."""
    return evaluate(
      self.config,
      self.module,
      self.params,
      self.tokenizer,
      self.data.sources[split],
      self.demographics,
      self.data.oracle,
      split=split,
    )

  def dataset(self, split: str, batch_size: int | None = None):
    """(one pass of evaluation batches in example order, the split's SurveyTables)."""
    return make_dataset(
      self.data.sources[split],
      self.tokenizer,
      max_length=self.config.data.max_length,
      batch_size=batch_size or self.config.eval.batch_size,
      shuffle=False,
      num_epochs=1,
      drop_remainder=False,
      demographic_system_prompt=self.config.data.demographic_system_prompt,
      supervision=self.config.data.supervision,
      shard_index=0,
      shard_count=1,
    )


# Environment variables that mark a multi-process launch jax.distributed discovers itself.
_CLUSTER_ENV = {
  "TPU_WORKER_HOSTNAMES": lambda v: "," in v,  # a TPU VM slice of several hosts
  "SLURM_NTASKS": lambda v: v.isdigit() and int(v) > 1,
  "OMPI_COMM_WORLD_SIZE": lambda v: v.isdigit() and int(v) > 1,
}


def initialize_distributed(config) -> bool:
  """Joins this process to a multi-process run as ``config.distributed`` says (before any
  other JAX call); returns whether it did."""
  d = config.distributed
  launched = any(test(os.environ.get(k, "")) for k, test in _CLUSTER_ENV.items())
  if d.initialize == "off" or (d.initialize == "auto" and not (launched or d.coordinator_address)):
    return False
  kwargs = {
    "coordinator_address": d.coordinator_address or None,
    "num_processes": d.num_processes or None,
    "process_id": None if d.process_id < 0 else d.process_id,
  }
  jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
  return True


def validate(config) -> None:
  """What can be refused before anything is read: the schema, a missing backbone, and a
  mesh that does not fit the model (the tiny backbone's, once it is built)."""
  schema.validate(config)
  _check_init_from(config)
  if config.model.architecture != schema.TINY and not config.model.checkpoint:
    raise errors.ConfigError(
      f"config.model.checkpoint is empty: running architecture "
      f"{config.model.architecture!r} needs a local Hugging Face directory "
      "(model.architecture alone serves shape-only commands such as cuma_jax.param_count)"
    )
  if config.model.checkpoint:
    check_layout(config, architecture(config))
  elif jax.process_count() > 1:
    raise errors.ConfigError(
      "the tiny backbone is built by single-process runs: run this config once in one "
      "process, then set config.model.checkpoint to its WORKDIR/assets/tiny_backbone_*/warmed_up"
    )


def _check_init_from(config) -> None:
  """An ``adapter.init_from`` directory matches the config's adapter (docs/interop.md)."""
  if config.method == "full" and config.adapter.init_from:
    raise errors.ConfigError(
      "config.adapter.init_from is set, but method='full' trains no adapters"
    )
  adapter = schema.adapter_config(config)
  if adapter is not None:
    adapter_import.check_config(adapter)


def architecture(config) -> ModelConfig:
  """The backbone's architecture: the checkpoint's config.json, else the bundled one (for
  the tiny backbone, its section with a vocabulary of ``tiny_backbone.vocab_size``; the
  trained tokenizer adds its few special tokens to that)."""
  if config.model.checkpoint:
    return ModelConfig.from_pretrained(config.model.checkpoint)
  if config.model.architecture == schema.TINY:
    return ModelConfig.from_hf(
      tiny_backbone.tiny_qwen3_config(config.tiny_backbone, config.tiny_backbone.vocab_size)
    )
  return ModelConfig.from_pretrained(
    os.path.join(schema.ARCHITECTURES_DIR, config.model.architecture + ".json")
  )


def check_layout(config, model_config: ModelConfig, devices=None) -> Layout:
  """The config's mesh and rules, refused (naming the axis and the dimension) when a mesh
  axis does not divide a dimension it splits, or a batch; nothing is allocated."""
  layout = Layout.of(config.mesh, devices)
  module = build_decoder(
    model_config, scan_layers=config.model.scan_layers, adapter=schema.adapter_config(config)
  )
  sizes = dict(layout.mesh.shape)
  problems = indivisible(abstract_params(module), sizes, layout.rules)
  split = layout.batch_split
  global_batch = config.data.batch_size * jax.process_count()
  if global_batch % split:
    problems.append(f"data.batch_size x processes = {global_batch} over the batch axes ({split})")
  if config.eval.batch_size % split:
    problems.append(f"eval.batch_size = {config.eval.batch_size} over the batch axes ({split})")
  if config.task == "preference":
    p = config.preference
    pairs = (p.dpo.batch_size or config.data.batch_size) * jax.process_count()
    samples = (p.grpo.prompts_per_step or config.data.batch_size) * p.grpo.group_size
    for name, rows in (("DPO pairs per step", pairs), ("GRPO samples per step", samples)):
      if rows % split:
        problems.append(f"{name} = {rows} over the batch axes ({split})")
  split_axes = [axis for axis, size in sizes.items() if size > 1]
  if config.model.scan_layers and len(split_axes) >= 3:
    # Measured: a scanned layer stack on a data x fsdp x model mesh gives LoRA B gradients
    # off by up to 40% (the loss is right); unscanned, or on two axes, they match one device.
    raise errors.ConfigError(
      f"model.scan_layers=True on a mesh split over {len(split_axes)} axes {split_axes} gives "
      "wrong adapter gradients (a known defect, docs/sharding.md); use a mesh of at most two "
      "axes of size > 1, or model.scan_layers=False"
    )
  if problems:
    raise errors.ConfigError(
      f"mesh {sizes} with rules_preset={config.mesh.rules_preset!r} does not divide: "
      + "; ".join(problems[:6])
      + (f" (and {len(problems) - 6} more)" if len(problems) > 6 else "")
      + ". Choose mesh.shape sizes that divide these, or another mesh.rules_preset."
    )
  return layout


def load_model(config, backbone_dir: str, layout: Layout):
  """The backbone with the config's adapter (initialised from ``config.seed``, or read from
  ``adapter.init_from``), loaded sharded onto ``layout`` in the config's dtypes."""
  adapter = schema.adapter_config(config)
  module, params = load_pretrained(
    backbone_dir,
    dtype=jnp.dtype(config.model.dtype),
    param_dtype=jnp.dtype(config.model.param_dtype),
    scan_layers=config.model.scan_layers,
    remat=config.model.remat,
    adapter=schema.adapter_config(config),
    rng=jax.random.PRNGKey(config.seed),
    layout=layout,
  )
  if adapter is not None and adapter.init_from:
    params = adapter_import.initialise(params, adapter, config.model.scan_layers)
  return module, params


def prepare(config, workdir: str, log=print) -> Experiment:
  """Prepares data, backbone, model, tokenizer and demographics of a validated config, after
  refusing a workdir whose checkpoints came from other inputs (before any model loads)."""
  os.makedirs(workdir, exist_ok=True)
  data = load_data(config, workdir, log)
  backbone_dir = config.model.checkpoint or tiny_backbone.build_warmed_up(
    config, os.path.join(workdir, "assets"), data, log
  )
  inputs = checkpointing.input_fingerprints(
    backbone=backbone_dir,
    encoder=encoder_path(config, backbone_dir),
    dataset=data.directory,
    adapter_init=config.adapter.init_from,
  )
  checkpointing.check_workdir(
    config, _checkpoint_dir(workdir), inputs, config_conflicts=schema.resume_conflicts
  )
  layout = check_layout(config, ModelConfig.from_pretrained(backbone_dir))
  module, params = load_model(config, backbone_dir, layout)
  train_tables = SurveyTables.of(data.sources["train"])
  return Experiment(
    config=config,
    workdir=workdir,
    data=data,
    backbone_dir=backbone_dir,
    module=module,
    params=params,
    tokenizer=load_tokenizer(backbone_dir),
    demographics=make_demographics(config, backbone_dir, data.sources["train"], layout),
    train_tables=train_tables,
    inputs=inputs,
  )


def run(config, workdir: str, log=print) -> dict:
  """Trains (``config.mode == 'train'``) and/or evaluates; returns the metrics it printed.

  The cheap checks come first and write nothing: the config, the workdir's checkpoints being
  of it, and for mode=eval their existence. The workdir is then locked for the rest of the run.
  A preference config is run by :func:`cuma_jax.alignment.run`.
  """
  validate(config)
  if config.task != "survey":
    raise errors.ConfigError(
      f"config.task={config.task!r} is run by cuma_jax.alignment.run (python -m cuma_jax.main "
      "dispatches on the task)"
    )
  check_workdir_path(workdir)
  step = checkpointing.check_workdir(
    config, _checkpoint_dir(workdir), config_conflicts=schema.resume_conflicts
  )
  if step is None and config.mode == "eval" and not config.adapter.init_from:
    raise errors.MissingInput(
      f"mode=eval needs a readable training checkpoint in {_checkpoint_dir(workdir)} (or "
      "adapters to evaluate: config.adapter.init_from)"
    )
  with WorkdirLock(workdir, enabled=jax.process_index() == 0, log=log):
    return _run(config, workdir, log)


def _run(config, workdir: str, log, *, baseline: bool = False) -> dict:
  experiment = prepare(config, workdir, log)
  results = {}
  if config.mode == "train" and config.eval.untrained:
    results["untrained"] = _evaluate_all(experiment)
    _report("untrained", results["untrained"], log)
  if config.mode == "train":
    experiment.params = _train(experiment, log)
  else:
    experiment.params = _trained_params(experiment, log)
  exports = export(config, workdir, experiment.params, log)
  results["trained"] = _evaluate_all(experiment)
  _report(config.method if baseline else "trained", results["trained"], log, models_only=baseline)
  for method in config.eval.baselines:
    results.setdefault("baselines", {})[method] = _run_baseline(experiment, method, log)
  write_results(config, workdir, results, exports, log)
  return results


def export(config, workdir: str, params: dict, log=print) -> dict[str, str]:
  """Exports (or verifies, rewriting what differs) the trained adapters in WORKDIR/adapters;
  returns {path in the workdir: SHA-256} (none for full fine-tuning)."""
  adapter = schema.adapter_config(config)
  if adapter is None:
    return {}
  trainable, _ = split_params(params, config.trainable)
  exported = dict(schema.as_dict(adapter), param_dtype=jnp.dtype(adapter.param_dtype).name)
  digests = checkpointing.export_adapters(
    trainable, exported, os.path.join(workdir, "adapters"), log
  )
  return {f"adapters/{name}": digest for name, digest in digests.items()}


def write_results(config, workdir: str, results: dict, exports: dict, log=print) -> None:
  """Writes WORKDIR/results.json with the exports' digests and what reproduces the run.

  An evaluation (mode=eval) updates what it evaluated and keeps the rest (the untrained
  model, other baselines, the training run's record, under "run"; its own is "eval_run").
  """
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "results.json")
  merged = {}
  if config.mode == "eval" and os.path.exists(path):
    try:
      with open(path) as f:
        merged = json.load(f)
    except ValueError as e:
      aside = f"{path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
      os.replace(path, aside)
      log(f"{path} is not JSON ({e}); moved it to {aside} and wrote a new one")
  baselines = {**merged.get("baselines", {}), **results.get("baselines", {})}
  merged.update(results, exports=exports)
  if baselines:
    merged["baselines"] = baselines
  merged["eval_run" if "run" in merged else "run"] = provenance(config)
  write_atomically(path, json.dumps(merged, indent=2))


def _run_baseline(experiment: Experiment, method: str, log) -> dict:
  """Trains (or restores) and evaluates ``method`` the way the experiment was trained."""
  config, workdir = experiment.config, os.path.join(experiment.workdir, "baselines", method)
  data_dir = config.data.data_dir or os.path.join(experiment.workdir, "tfds")
  baseline = presets.baseline_config(
    config, method, backbone=experiment.backbone_dir, data_dir=data_dir
  )
  log(f"baseline {method}: the same data, backbone, steps and optimiser, in {workdir}")
  with WorkdirLock(workdir, enabled=jax.process_index() == 0, log=log):
    return _run(baseline, workdir, log, baseline=True)["trained"]


# Distributions whose versions a run records (results.json "run").
RECORDED_PACKAGES = (
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "transformers",
  "numpy",
)


def command_line() -> str:
  """This process's command line, as ``python -m module ...`` when it was run so."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  head = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
  return shlex.join([*head, *sys.argv[1:]])


def provenance(config) -> dict:
  """What reproduces a run: its exact config and seed, the command line, library versions,
  devices."""
  return {
    "config": checkpointing.config_to_json(config),
    "command": command_line(),
    "seed": config.seed,
    "versions": {
      "python": platform.python_version(),
      **{name: importlib.metadata.version(name) for name in RECORDED_PACKAGES},
    },
    "devices": {"kind": jax.devices()[0].device_kind, "count": jax.device_count()},
  }


def restore(workdir: str, config: ml_collections.ConfigDict | None = None, log=print):
  """The trained experiment of ``workdir``: its config (the latest checkpoint's, unless
  given), model, trained parameters, tokenizer, data and demographics.  With a ``config``
  whose ``adapter.init_from`` is set, a workdir without checkpoints gives those adapters."""
  if config is None or not config.adapter.init_from:
    _require_checkpoint(workdir)
  if config is None:
    config = _saved_config(workdir)
  validate(config)
  experiment = prepare(config, workdir, log)
  experiment.params = _trained_params(experiment, log)
  return experiment


def _train(experiment: Experiment, log) -> dict:
  config, sources = experiment.config, experiment.data.sources
  dataset, _ = make_dataset(
    sources["train"],
    experiment.tokenizer,
    max_length=config.data.max_length,
    batch_size=config.data.batch_size,
    seed=config.data.shuffle_seed,
    num_epochs=None,
    demographic_system_prompt=config.data.demographic_system_prompt,
    supervision=config.data.supervision,
    tables=experiment.train_tables,
  )
  result = loop.train(
    config,
    _train_dir(experiment.workdir),
    experiment.module,
    experiment.params,
    dataset,
    num_steps=loop.total_steps(config, len(sources["train"])),
    demographic_table=demographic_table(experiment.demographics, experiment.train_tables),
    inputs=experiment.inputs,
    config_conflicts=schema.resume_conflicts,
    log=log,
  )
  return merge_params(result.trainable, result.frozen)


def _evaluate_all(experiment: Experiment) -> dict:
  return {split: experiment.evaluate(split) for split in experiment.config.eval.splits}


def _train_dir(workdir: str) -> str:
  return os.path.join(workdir, "train")


def _checkpoint_dir(workdir: str) -> str:
  return os.path.join(_train_dir(workdir), "checkpoints")


def _has_checkpoint(workdir: str) -> bool:
  directory = _checkpoint_dir(workdir)
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _require_checkpoint(workdir: str) -> None:
  """Refuses a workdir without training checkpoints, creating nothing."""
  if not _has_checkpoint(workdir):
    raise errors.MissingInput(f"{workdir} has no training checkpoint in {_checkpoint_dir(workdir)}")


def _saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of the workdir's latest checkpoint, completed with the schema's defaults."""
  config = overrides.recorded_config(workdir)
  config.mode = "eval"
  config.lock()
  return config


def _trained_params(experiment: Experiment, log=print) -> dict:
  """The newest readable checkpoint's trainable parameters over the loaded backbone (or,
  without checkpoints, the adapters ``adapter.init_from`` gave the model)."""
  config = experiment.config
  if config.adapter.init_from and not _has_checkpoint(experiment.workdir):
    return experiment.params
  trainable, frozen = split_params(
    experiment.params, config.trainable, frozen_dtype=jnp.dtype(config.model.param_dtype)
  )
  ckpt = checkpointing.TrainCheckpoints.of(
    config,
    _checkpoint_dir(experiment.workdir),
    inputs=experiment.inputs,
    config_conflicts=schema.resume_conflicts,
    log=log,
  )
  try:
    restored = ckpt.restore_latest(loop.abstract_state(config, trainable))
  finally:
    ckpt.close()
  if restored is None:
    raise errors.MissingInput(f"{ckpt.directory} has no training checkpoint to evaluate")
  return merge_params(restored[1]["trainable"], frozen)


def _report(name, results, log, models_only=False):
  for split, by_predictor in results.items():
    for predictor, m in by_predictor.items():
      if models_only and predictor != "model":
        continue
      label = name if predictor == "model" else predictor
      log(
        f"[{split}] {label:>16}: accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  "
        f"EMD {m['emd_mean']:.4f}  diversity {m['profile_diversity']:.2f}"
      )
