"""What every task runs on: distributed set-up, layout checks, model, encoder and tiny backbone
loading, workdir handling, exports and provenance.

A task (:mod:`cuma_jax.tasks`) is a :class:`Task`: the runtime calls its hooks (its data, its
checkpoints, its profiles, its warm-up batches) and it builds its own
:class:`Experiment` subclass on the fields every task shares.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
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

from cuma_jax import errors, fingerprint, presets, schema
from cuma_jax.checkpoints import adapter_import
from cuma_jax.data import profile_questions
from cuma_jax.encoders import (
  DemographicEncoder,
  Demographics,
  FittedNgramEncoder,
  PrecomputedEncoder,
)
from cuma_jax.models.config import ModelConfig
from cuma_jax.models.pretrained import (
  abstract_params,
  build_decoder,
  load_pretrained,
  load_tokenizer,
  save_pretrained,
)
from cuma_jax.params import merge_params, split_params
from cuma_jax.sharding import Layout, indivisible
from cuma_jax.tiny import backbone as tiny_backbone
from cuma_jax.tiny.tokenizer import build_tiny_tokenizer
from cuma_jax.training import checkpointing, loop
from cuma_jax.training.workdir import write_atomically

# A resume check: (saved config, current config) -> the conflicts that refuse the checkpoint.
Conflicts = Callable[[dict, dict], list[str]]


@dataclasses.dataclass
class Data:
  sources: dict[str, Any]  # split -> tfds data source
  oracle: Any  # the synthetic data's ground truth (SurveyOracle, PreferenceOracle), or None
  directory: str  # the prepared dataset's files


@dataclasses.dataclass
class Experiment:
  """What every task's run is made of; a task's own subclass adds what it derives from these
  (``__post_init__``)."""

  config: schema.Config
  workdir: str
  data: Data
  backbone_dir: str
  module: Any  # cuma_jax.models.decoder.Decoder
  params: dict
  tokenizer: Any
  demographics: Demographics | None
  inputs: dict  # fingerprints of the backbone, encoder and prepared dataset


class Task(abc.ABC):
  """A kind of experiment (``config.task``): what the runtime asks of it while it prepares a
  run. :mod:`cuma_jax.tasks` registers each by name; ``run`` and ``restore`` are its entry
  points."""

  experiment_type: type[Experiment]
  train_split: str  # the split the demographics are read from and the tiny backbone warms up on

  @abc.abstractmethod
  def load_data(self, config: schema.Config, workdir: str, log=print) -> Data:
    """Opens the prepared dataset of ``config.data`` (prepared once per its inputs)."""

  @abc.abstractmethod
  def check_checkpoints(self, config: schema.Config, workdir: str, inputs: dict) -> None:
    """Refuses a workdir whose checkpoints came from another config or other inputs."""

  @abc.abstractmethod
  def checkpoint_dirs(self, workdir: str) -> tuple[str, ...]:
    """Where its checkpoints may be, the furthest trained first (the recorded config is the
    first one's: ``cuma_jax.tasks.recorded_config``)."""

  def batch_rows(self, config: schema.Config) -> list[tuple[str, int]]:
    """Its own rows per step besides ``data.batch_size`` (named), split over the batch axes."""
    del config
    return []

  @abc.abstractmethod
  def profiles(self, source) -> tuple[str, ...]:
    """The training split's sorted distinct profiles."""

  @abc.abstractmethod
  def answers(self, train_source) -> list[tuple[str, str, int]]:
    """(profile, question id, option) of each training row whose chosen option is known: what
    the fitted n-gram encoder is fitted to."""

  @abc.abstractmethod
  def warmup_corpus(self, data: Data) -> Iterable[str]:
    """The texts the tiny backbone's tokenizer is trained on."""

  @abc.abstractmethod
  def warmup_description(self, warm: schema.Config) -> str:
    """What the tiny backbone's warm-up trains on, for the log."""

  @abc.abstractmethod
  def warmup_batches(self, warm: schema.Config, data: Data, tokenizer, module) -> tuple[Any, Any]:
    """(batches, objective or None for the SFT one) of the tiny backbone's warm-up ``warm``."""

  @abc.abstractmethod
  def run(
    self,
    config: schema.ConfigLike,
    workdir: str,
    log=print,
    *,
    encoders: FittedEncoders | None = None,
  ):
    """Trains and/or evaluates (validating ``config`` first); returns the metrics it printed."""

  @abc.abstractmethod
  def restore(
    self,
    workdir: str,
    config: schema.ConfigLike,
    log=print,
    *,
    encoders: FittedEncoders | None = None,
  ) -> Experiment:
    """The trained experiment of ``workdir`` run with ``config`` (validated first)."""


def process_zero_first(name: str, make):
  """``make()`` on process 0, then on the others once it is done (they reuse what process 0
  wrote, e.g. a prepared dataset); in a single-process run just ``make()``."""
  if jax.process_count() == 1:
    return make()
  result = make() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(name)
  return result if jax.process_index() == 0 else make()


def _reads_profiles(config: schema.Config) -> bool:
  adapter = schema.adapter_config(config)
  return adapter is not None and adapter.uses_demographics


def encoder_path(config: schema.Config, backbone_dir: str) -> str | None:
  """The demographic encoder's checkpoint or .npz (None when the routers read no profiles,
  or when the encoder is fitted to the dataset, which is fingerprinted on its own)."""
  if not _reads_profiles(config) or config.encoder.kind == "fitted_ngrams":
    return None
  return config.encoder.precomputed or config.encoder.checkpoint or backbone_dir


class FittedEncoders:
  """Fitted n-gram encoders by the inputs of their fit: (prepared dataset directory, split,
  width, ridge). A prepared dataset's directory is named by its inputs' digest, so the key
  identifies the fit. A run shares its own with its baselines; a process running many
  experiments on one dataset (experiments/mean_collapse) passes one to every run and fits
  once."""

  def __init__(self):
    self._fitted: dict[tuple, FittedNgramEncoder] = {}

  def get(self, config: schema.Config, task: Task, train_source) -> FittedNgramEncoder:
    """The n-gram encoder fitted to the training split's answers (``encoder.kind``)."""
    info = getattr(train_source, "dataset_info", None)
    if info is None:  # not a prepared dataset: nothing names its contents
      return fit_ngram_encoder(config, task, train_source)
    key = (
      str(info.data_dir),
      str(train_source.split),
      config.adapter.demographic_dim,
      config.encoder.ridge,
    )
    if key not in self._fitted:
      self._fitted[key] = fit_ngram_encoder(config, task, train_source)
    return self._fitted[key]


def fit_ngram_encoder(config: schema.Config, task: Task, train_source) -> FittedNgramEncoder:
  answers = task.answers(train_source)
  questions: dict[str, int] = {}
  return FittedNgramEncoder.fit(
    [profile for profile, _, _ in answers],
    [questions.setdefault(question, len(questions)) for _, question, _ in answers],
    [option for _, _, option in answers],
    dim=config.adapter.demographic_dim,
    ridge=config.encoder.ridge,
  )


def make_demographics(
  config: schema.Config,
  backbone_dir: str,
  task: Task,
  train_source,
  layout: Layout | None = None,
  encoders: FittedEncoders | None = None,
) -> Demographics | None:
  """The router's demographic inputs (None when the routers do not read them); a decoder
  encoder is loaded onto ``layout`` when given, a fitted one taken from ``encoders``."""
  if not _reads_profiles(config):
    return None
  profiles = task.profiles(train_source)
  if config.encoder.kind == "fitted_ngrams":
    encoder = (encoders or FittedEncoders()).get(config, task, train_source)
    if not config.encoder.standardize:
      return Demographics(encoder)
    return Demographics.standardized(encoder, profiles)
  path = encoder_path(config, backbone_dir)
  adapter = schema.adapter_config(config)
  if path is None or adapter is None:  # both set whenever the routers read profiles
    raise errors.ConfigError(f"config.method={config.method!r} reads no demographic encoder")
  precomputed = None
  if config.encoder.precomputed:
    precomputed = PrecomputedEncoder(path)
    width = precomputed.dim
  else:
    width = ModelConfig.from_pretrained(path).hidden_size  # Before loading a large model.
  if width != adapter.demographic_dim:
    raise errors.ConfigError(
      f"the demographic encoder at {path} gives vectors of width {width}, "
      f"but config.adapter.demographic_dim={adapter.demographic_dim}; set "
      "config.encoder.checkpoint (e.g. Qwen3-Embedding-0.6B)"
    )
  loaded = (
    precomputed
    if precomputed is not None
    else DemographicEncoder.from_pretrained(
      path, pooling=config.encoder.pooling, max_length=config.encoder.max_length, layout=layout
    )
  )
  if not config.encoder.standardize:
    return Demographics(loaded)
  return Demographics.standardized(loaded, profiles)


# Environment variables that mark a multi-process launch jax.distributed discovers itself.
_CLUSTER_ENV = {
  "TPU_WORKER_HOSTNAMES": lambda v: "," in v,  # a TPU VM slice of several hosts
  "SLURM_NTASKS": lambda v: v.isdigit() and int(v) > 1,
  "OMPI_COMM_WORLD_SIZE": lambda v: v.isdigit() and int(v) > 1,
}


def initialize_distributed(config: schema.ConfigLike) -> bool:
  """Joins this process to a multi-process run as ``config.distributed`` says (before any
  other JAX call); returns whether it did."""
  d = config.distributed
  launched = any(test(os.environ.get(k, "")) for k, test in _CLUSTER_ENV.items())
  if d.initialize == "off" or (d.initialize == "auto" and not (launched or d.coordinator_address)):
    return False
  # Unset values are discovered from the environment.
  jax.distributed.initialize(
    coordinator_address=d.coordinator_address or None,
    num_processes=d.num_processes or None,
    process_id=None if d.process_id < 0 else d.process_id,
  )
  return True


def validate(given: schema.ConfigLike, task: Task) -> schema.Config:
  """The typed config the task runs with, after what can be refused before anything is read:
  the schema, a missing backbone, and a mesh that does not fit the model (the tiny
  backbone's, once it is built)."""
  config = schema.validate(given)
  _check_init_from(config)
  if config.model.architecture != schema.TINY and not config.model.checkpoint:
    raise errors.ConfigError(
      f"config.model.checkpoint is empty: running architecture "
      f"{config.model.architecture!r} needs a local Hugging Face directory "
      "(model.architecture alone serves shape-only commands such as cuma_jax.param_count)"
    )
  if config.model.checkpoint:
    check_layout(config, architecture(config), batches=task.batch_rows(config))
  elif jax.process_count() > 1:
    raise errors.ConfigError(
      "the tiny backbone is built by single-process runs: run this config once in one "
      "process, then set config.model.checkpoint to its WORKDIR/assets/tiny_backbone_*/warmed_up"
    )
  return config


def _check_init_from(config: schema.Config) -> None:
  """An ``adapter.init_from`` directory matches the config's adapter (docs/interop.md)."""
  if config.method == "full" and config.adapter.init_from:
    raise errors.ConfigError(
      "config.adapter.init_from is set, but method='full' trains no adapters"
    )
  adapter = schema.adapter_config(config)
  if adapter is not None:
    adapter_import.check_config(adapter)


def architecture(config: schema.Config) -> ModelConfig:
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


def check_layout(
  config: schema.Config,
  model_config: ModelConfig,
  devices=None,
  batches: Iterable[tuple[str, int]] = (),
) -> Layout:
  """The config's mesh and rules, refused (naming the axis and the dimension) when a mesh
  axis does not divide a dimension it splits, or a batch (``batches``: a task's own rows
  per step, :meth:`Task.batch_rows`); nothing is allocated."""
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
  for name, rows in batches:
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


def load_model(config: schema.Config, backbone_dir: str, layout: Layout):
  """The backbone with the config's adapter (initialised from ``config.seed``, or read from
  ``adapter.init_from``), loaded sharded onto ``layout`` in the config's dtypes."""
  adapter = schema.adapter_config(config)
  module, params = load_pretrained(
    backbone_dir,
    dtype=jnp.dtype(config.model.dtype),
    param_dtype=jnp.dtype(config.model.param_dtype),
    scan_layers=config.model.scan_layers,
    remat=config.model.remat,
    adapter=adapter,
    rng=jax.random.PRNGKey(config.seed),
    layout=layout,
  )
  if adapter is not None and adapter.init_from:
    params = adapter_import.initialise(params, adapter, config.model.scan_layers)
  return module, params


def build_tiny_backbone(
  config: schema.Config, assets: str, data: Data, task: Task, log=print
) -> str:
  """The embedded default's backbone: a tiny Qwen3 given general competence locally.

  A random tiny Qwen3 and a BPE tokenizer are built from the task's texts
  (:meth:`Task.warmup_corpus`), then fully fine-tuned for ``tiny_backbone.warmup_steps`` on
  the task's warm-up batches (:meth:`Task.warmup_batches`; a survey's without profiles, the
  preference rows under another user's profile): the "base model" CuMA then specialises per
  culture. Cached in ``assets/tiny_backbone_<key>``, the key being a digest of the prepared
  data and the warm-up settings, so changing either builds a new backbone instead of reusing
  one made from other inputs.
  """
  warm = presets.warmup_config(config)
  key = fingerprint.digest(
    {"data": fingerprint.fingerprint(data.directory), "warmup": _warmup_settings(warm)}
  )
  cache = os.path.join(assets, f"tiny_backbone_{key}")
  final = os.path.join(cache, "warmed_up")
  if tiny_backbone.is_checkpoint(final):
    log(f"reusing the warmed-up tiny backbone in {final} (same data and warm-up settings)")
    return final
  random_dir = os.path.join(cache, "random")
  if not tiny_backbone.is_checkpoint(random_dir):
    tokenizer = build_tiny_tokenizer(
      task.warmup_corpus(data), random_dir, vocab_size=config.tiny_backbone.vocab_size
    )
    tiny_backbone.write_random_qwen3(random_dir, tokenizer, config.tiny_backbone, seed=config.seed)
  log(
    f"warm-up: full fine-tuning of the tiny backbone for {warm.train.num_steps} steps "
    + task.warmup_description(warm)
  )
  module, params = load_pretrained(random_dir)
  tokenizer = load_tokenizer(random_dir)
  dataset, objective = task.warmup_batches(warm, data, tokenizer, module)
  result = loop.train(
    warm,
    os.path.join(cache, "warmup"),
    module,
    params,
    dataset,
    num_steps=warm.train.num_steps,
    objective=objective,
    log=log,
  )
  save_pretrained(module, merge_params(result.trainable, result.frozen), final + ".tmp")
  tokenizer.save_pretrained(final + ".tmp")
  os.replace(final + ".tmp", final)
  return final


def _warmup_settings(warm: schema.Config) -> dict:
  """Every setting the warmed-up weights depend on besides the data."""
  return {
    "seed": warm.seed,
    "tiny_backbone": schema.as_dict(warm.tiny_backbone),
    "optim": schema.as_dict(warm.optim),
    "max_length": warm.data.max_length,
    "shuffle_seed": warm.data.shuffle_seed,
    "task": warm.task,
    "preference_lengths": (
      warm.preference.max_prompt_length,
      warm.preference.max_completion_length,
    ),
    **(
      {"profile_questions": profile_questions.FORMAT}
      if warm.tiny_backbone.warmup == "profile_reading"
      else {}
    ),
  }


def prepare(
  config: schema.Config, workdir: str, task: Task, log=print, encoders: FittedEncoders | None = None
) -> Experiment:
  """Prepares data, backbone, model, tokenizer and demographics of a validated config as the
  task's experiment, after refusing a workdir whose checkpoints came from other inputs
  (before any model loads)."""
  os.makedirs(workdir, exist_ok=True)
  data = task.load_data(config, workdir, log)
  backbone_dir = config.model.checkpoint or build_tiny_backbone(
    config, os.path.join(workdir, "assets"), data, task, log
  )
  inputs = checkpointing.input_fingerprints(
    backbone=backbone_dir,
    encoder=encoder_path(config, backbone_dir),
    dataset=data.directory,
    adapter_init=config.adapter.init_from,
  )
  task.check_checkpoints(config, workdir, inputs)
  layout = check_layout(
    config, ModelConfig.from_pretrained(backbone_dir), batches=task.batch_rows(config)
  )
  module, params = load_model(config, backbone_dir, layout)
  train_source = data.sources[task.train_split]
  return task.experiment_type(
    config=config,
    workdir=workdir,
    data=data,
    backbone_dir=backbone_dir,
    module=module,
    params=params,
    tokenizer=load_tokenizer(backbone_dir),
    demographics=make_demographics(config, backbone_dir, task, train_source, layout, encoders),
    inputs=inputs,
  )


def trained_params(
  experiment: Experiment, directory: str, *, inputs: dict, conflicts: Conflicts, log=print
) -> dict | None:
  """The trainable parameters of the newest readable checkpoint in ``directory`` over the
  loaded backbone (None when it has none)."""
  config = experiment.config
  trainable, frozen = split_params(
    experiment.params, config.trainable, frozen_dtype=jnp.dtype(config.model.param_dtype)
  )
  ckpt = checkpointing.TrainCheckpoints.of(
    config, directory, inputs=inputs, config_conflicts=conflicts, log=log
  )
  try:
    restored = ckpt.restore_latest(loop.abstract_state(config, trainable))
  finally:
    ckpt.close()
  return None if restored is None else merge_params(restored[1]["trainable"], frozen)


def has_checkpoint(directory: str) -> bool:
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def baseline_of(experiment: Experiment, method: str) -> tuple[schema.Config, str]:
  """``method`` trained beside the experiment (``eval.baselines``): its config (the same
  data and backbone) and its workdir."""
  config = experiment.config
  data_dir = config.data.data_dir or os.path.join(experiment.workdir, "tfds")
  baseline = presets.baseline_config(
    config, method, backbone=experiment.backbone_dir, data_dir=data_dir
  )
  return baseline, os.path.join(experiment.workdir, "baselines", method)


def export(config: schema.Config, workdir: str, params: dict, log=print) -> dict[str, str]:
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


def write_results(
  config: schema.Config, workdir: str, results: dict, exports: dict, log=print
) -> None:
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


def provenance(config: schema.Config) -> dict:
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
