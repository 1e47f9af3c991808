"""The experiment config's schema: every section a dataclass, every key a field with its range.

The ``ml_collections`` config that ``configs/*.py`` return is generated from these
dataclasses (:func:`defaults`), so a key exists exactly when a field does; :func:`validate`
rebuilds them from the config, which range-checks every field (``cuma_jax.fields``) before
anything is loaded, then checks what spans fields.  The ``adapter`` section is
:class:`~cuma_jax.layers.adapter_config.AdapterConfig` itself and ``data.synthetic`` is
:class:`~cuma_jax.data.synthetic.SyntheticSurveyConfig`: no hand-written copies.

Each field is also classified for resuming (``fields.IDENTITY`` / ``STRUCTURAL`` /
``FREE``): :func:`resume_conflicts` names the keys whose change a checkpoint cannot take.
A key that a checkpoint's config lacks (written before the field existed) compares as
the field's default, so new fields whose default keeps the old behaviour resume.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any, ClassVar, TypeAlias

import ml_collections

from cuma_jax import errors, fields
from cuma_jax.data.ca_prompts import CA_MODES
from cuma_jax.data.chat import SFT_TRUNCATIONS
from cuma_jax.data.preference_sources import SPLIT_MODES
from cuma_jax.data.synthetic import SPLITS as SYNTHETIC_SPLITS
from cuma_jax.data.synthetic import SyntheticSurveyConfig
from cuma_jax.data.synthetic_preference import SyntheticPreferenceConfig
from cuma_jax.data.tokenize import END_OF_TURN, SUPERVISION
from cuma_jax.encoders import ENCODER_KINDS, POOLING_MODES
from cuma_jax.evaluation.judging import JUDGE_PROMPTS
from cuma_jax.fields import FREE, STRUCTURAL, field
from cuma_jax.layers.adapter import ROUTERS
from cuma_jax.layers.adapter_config import AdapterConfig
from cuma_jax.layers.routing import GATES
from cuma_jax.models.decoder import REMAT_POLICIES
from cuma_jax.params import TRAINABLE_MODES
from cuma_jax.registry import Registry
from cuma_jax.sharding import RULES_PRESETS, check_axis_names
from cuma_jax.training.checkpointing import CORRUPT_CHECKPOINT_POLICIES
from cuma_jax.training.preference import GRPO_LOSS_TYPES

ARCHITECTURES_DIR = os.path.join(os.path.dirname(__file__), "architectures")
METHODS = ("cuma", "lora", "hydralora", "mixlora", "prefix", "full")
ABLATIONS = ("none", "soft_routing", "no_demographics", "no_balance_loss", "minimal")
DTYPES = ("float32", "bfloat16")
# "survey": SFT on a value survey, scored on its answer distributions; "preference": chat
# SFT then DPO and/or GRPO on preference data, scored by CA accuracy and judged win-rate.
TASKS = ("survey", "preference")
SURVEY_DATASETS = ("synthetic", "wvb")
PREFERENCE_DATASETS = ("synthetic_preference", "community_alignment", "prism")
STAGES = ("sft", "dpo", "grpo")
SCHEDULES = ("constant", "linear", "cosine")
TINY = "tiny"
WARMUPS = ("profile_blind", "profile_reading")
# Splits each dataset has (synthetic: those of non-zero size).
WVB_SPLITS = {"full": ("train", "valid", "test"), "sampled_50k": ("train", "valid", "test")}


def available_architectures() -> tuple[str, ...]:
  """Bundled config.json files (shape-only work: parameter counts, memory plans)."""
  return tuple(sorted(f[:-5] for f in os.listdir(ARCHITECTURES_DIR) if f.endswith(".json")))


def _tuples(value):
  return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True)
class Section:
  """A config section: range-checks its fields on construction."""

  KEY: ClassVar[str] = ""

  def __post_init__(self):
    for f in dataclasses.fields(self):
      object.__setattr__(self, f.name, _tuples(getattr(self, f.name)))
    fields.check(self, self.KEY)


@dataclasses.dataclass(frozen=True)
class ModelSection(Section):
  KEY: ClassVar[str] = "model"
  # Local Hugging Face directory of the backbone (needed to run any architecture but
  # "tiny").
  checkpoint: str = field("", resume=FREE)
  # Used when ``checkpoint`` is "": "tiny" builds the backbone locally from the
  # ``tiny_backbone`` section (CPU-sized presets); a bundled config.json name serves
  # shape-only work (parameter counts) before a checkpoint is given.
  architecture: str = field("qwen3-8b", choices=lambda: (TINY, *available_architectures()))
  dtype: str = field("bfloat16", choices=DTYPES)  # compute
  param_dtype: str = field("bfloat16", choices=DTYPES)  # the frozen backbone's weights
  scan_layers: bool = field(True, choices=(False, True))
  remat: str = field("full", choices=REMAT_POLICIES, resume=FREE)


@dataclasses.dataclass(frozen=True)
class EncoderSection(Section):
  KEY: ClassVar[str] = "encoder"
  # "decoder": a pooled hidden-states decoder (the paper's); "fitted_ngrams": word n-grams
  # projected by a ridge regression fitted to the training answers (docs/method.md).
  kind: str = field("decoder", choices=ENCODER_KINDS)
  # Local Qwen3-Embedding-style directory ("" = the backbone's own).
  checkpoint: str = field("", resume=FREE)
  # .npz of profiles/embeddings, used instead of encoding when set.
  precomputed: str = field("", resume=FREE)
  pooling: str = field("mean", choices=POOLING_MODES)
  max_length: int = field(128, low=1)
  # Centre and scale each dimension with the training profiles' statistics (reused for
  # evaluation): for weak encoders whose vectors are nearly parallel.
  standardize: bool = field(False, choices=(False, True))
  # The fitted n-gram encoder's ridge penalty (on 0/1 n-gram features).
  ridge: float = field(1.0, low=0.0)


@dataclasses.dataclass(frozen=True)
class DataSection(Section):
  KEY: ClassVar[str] = "data"
  dataset: str = field("wvb", choices=SURVEY_DATASETS + PREFERENCE_DATASETS)
  builder_config: str = field("sampled_50k", choices=tuple(WVB_SPLITS))  # wvb only
  manual_dir: str = field("", resume=FREE)  # WorldValuesBench root (docs/data.md)
  data_dir: str = field("", resume=FREE)  # prepared TFDS files ("" = WORKDIR/tfds)
  max_length: int = field(1024, low=1)
  batch_size: int = field(16, low=1)  # per process: each reads its own shard
  demographic_system_prompt: bool = field(True, choices=(False, True))
  # Supervised answer tokens (docs/data.md#supervision): the letter and the end-of-turn
  # token, or "released": what the released training supervises.
  supervision: str = field(END_OF_TURN, choices=SUPERVISION)
  shuffle_seed: int = field(42)
  synthetic: SyntheticSurveyConfig = dataclasses.field(default_factory=SyntheticSurveyConfig)
  # Preference data: split by conversation, or at row level as the released code (which
  # lets a conversation's turns fall on both sides).
  split_mode: str = field("conversation", choices=SPLIT_MODES)
  synthetic_preference: SyntheticPreferenceConfig = dataclasses.field(
    default_factory=SyntheticPreferenceConfig
  )


@dataclasses.dataclass(frozen=True)
class TinyBackboneSection(Section):
  """The tiny backbone built when ``model.checkpoint`` is "": a random Qwen3 warmed up by
  full fine-tuning on the survey without profiles in the prompt."""

  KEY: ClassVar[str] = "tiny_backbone"
  vocab_size: int = field(1024, low=300)  # 256 bytes, the chat specials, some merges
  hidden_size: int = field(64, low=8)
  num_layers: int = field(2, low=1)
  num_heads: int = field(4, low=1)  # of head_dim 16
  num_kv_heads: int = field(2, low=1)
  # The vocabulary padded to a multiple of this (as released models pad theirs), e.g. for
  # tensor parallelism on CPU devices.
  vocab_multiple: int = field(1, low=1)
  warmup_steps: int = field(300, low=0)
  # "profile_blind": the survey without profiles (the base is mean-collapsed and has never
  # read a profile); "profile_reading": the same, mixed with questions about each training
  # profile's own fields asked under that profile (docs/data.md#profile-reading-warm-up), so
  # text-only methods start from a backbone that reads the system prompt. Survey task only.
  warmup: str = field("profile_blind", choices=WARMUPS)
  warmup_learning_rate: float = field(3e-3, low=0, low_open=True)
  warmup_batch_size: int = field(32, low=1)


@dataclasses.dataclass(frozen=True)
class OptimSection(Section):
  KEY: ClassVar[str] = "optim"
  learning_rate: float = field(5e-6, low=0, resume=FREE)
  b1: float = field(0.9, low=0, high=1, high_open=True, resume=FREE)
  b2: float = field(0.999, low=0, high=1, high_open=True, resume=FREE)
  # Applies to matrices only (not biases, norm scales), as Hugging Face's Trainer.
  weight_decay: float = field(0.01, low=0, resume=FREE)
  schedule: str = field("constant", choices=SCHEDULES, resume=FREE)
  warmup_steps: int = field(0, low=0, resume=FREE)
  # Steps the schedule decays over (0: the run's steps); the released SFT decays over 1,000
  # steps whatever the run's length.
  horizon_steps: int = field(0, low=0, resume=FREE)
  # 0 = no clipping; switching clipping on or off changes the optimiser state's tree.
  grad_clip: float = field(1.0, low=0, resume=STRUCTURAL)
  accumulation_steps: int = field(1, low=1, resume=STRUCTURAL)
  label_smoothing: float = field(0.0, low=0, high=1, high_open=True, resume=FREE)
  lambda_aux: float = field(0.01, low=0, resume=FREE)  # weight of the summed balance losses


@dataclasses.dataclass(frozen=True)
class TrainSection(Section):
  KEY: ClassVar[str] = "train"
  num_epochs: int = field(3, low=0, resume=FREE)
  num_steps: int = field(-1, low=-1, resume=FREE)  # -1: num_epochs over the training split
  log_every: int = field(10, low=1, resume=FREE)
  checkpoint_every: int = field(500, low=1, resume=FREE)
  keep_checkpoints: int = field(3, low=1, resume=FREE)
  progress_bar: bool = field(True, choices=(False, True), resume=FREE)
  # An unreadable checkpoint step: "fallback" resumes from the newest readable one (moving
  # the unreadable aside), "stop" stops and says how to discard it.
  on_corrupt_checkpoint: str = field("fallback", choices=CORRUPT_CHECKPOINT_POLICIES, resume=FREE)


@dataclasses.dataclass(frozen=True)
class EvalSection(Section):
  KEY: ClassVar[str] = "eval"
  batch_size: int = field(32, low=1, resume=FREE)
  splits: tuple[str, ...] = field(("test",), choices=SYNTHETIC_SPLITS, resume=FREE)
  # sigma-inequity over the 8 profile fields, country included (the released evaluation);
  # False: over the 7 others (docs/evaluation.md#inequity).
  inequity_includes_country: bool = field(True, choices=(False, True), resume=FREE)
  # Evaluate the model before training too (the "untrained" rows of results.json).
  untrained: bool = field(True, choices=(False, True), resume=FREE)
  # Methods trained beside this run on its data, backbone, steps and optimiser, each in
  # WORKDIR/baselines/<method>, and reported in the same table.
  baselines: tuple[str, ...] = field((), choices=METHODS, resume=FREE)
  # The LoRA baseline's rank (0: the run's adapter.rank), alpha scaled with it; the demo sets
  # the rank whose trainable parameters match CuMA's (cuma_jax.param_count).
  lora_baseline_rank: int = field(0, low=0, resume=FREE)
  # ((method, learning rate), ...): a baseline's own rate (others take the run's), each
  # chosen on the validation split (experiments/demo/results.md).
  baseline_learning_rates: tuple[tuple[str, float], ...] = field((), resume=FREE)


@dataclasses.dataclass(frozen=True)
class DpoSection(Section):
  KEY: ClassVar[str] = "preference.dpo"
  num_steps: int = field(-1, low=-1, resume=FREE)  # -1: one epoch of the DPO pairs
  batch_size: int = field(0, low=0)  # pairs per step (0: data.batch_size)
  # The stage's optimiser settings (the rest — betas, clipping — are config.optim's).
  learning_rate: float = field(5e-6, low=0, low_open=True, resume=FREE)
  schedule: str = field("linear", choices=SCHEDULES, resume=FREE)
  warmup_steps: int = field(0, low=0, resume=FREE)
  weight_decay: float = field(0.0, low=0, resume=FREE)
  beta: float = field(0.1, low=0, low_open=True)
  # "base": the backbone with the adapters off (no second copy); "sft": the policy's
  # adapters as the SFT stage left them.
  reference: str = field("base", choices=("base", "sft"))
  lambda_aux: float = field(0.0, low=0, resume=FREE)  # balance loss: off by default


@dataclasses.dataclass(frozen=True)
class GrpoSection(Section):
  KEY: ClassVar[str] = "preference.grpo"
  num_steps: int = field(100, low=1, resume=FREE)
  learning_rate: float = field(1e-6, low=0, low_open=True, resume=FREE)
  schedule: str = field("linear", choices=SCHEDULES, resume=FREE)
  warmup_steps: int = field(0, low=0, resume=FREE)
  weight_decay: float = field(0.0, low=0, resume=FREE)
  # Prompts per step (0: data.batch_size); each is sampled group_size times.
  prompts_per_step: int = field(0, low=0)
  group_size: int = field(8, low=2)
  # Prompt tokens kept for sampling (their last ones), as TRL's GRPO keeps 512.
  max_prompt_length: int = field(512, low=1)
  max_new_tokens: int = field(256, low=1)
  temperature: float = field(1.0, low=0, low_open=True)
  top_p: float = field(1.0, low=0, low_open=True, high=1)
  clip_epsilon: float = field(0.2, low=0, low_open=True, resume=FREE)
  loss_type: str = field("dapo", choices=GRPO_LOSS_TYPES)
  kl_beta: float = field(0.0, low=0)  # > 0: KL to the adapters-off backbone
  # What the candidate is judged against: the pair's chosen reply, the base model's greedy
  # reply, or (synthetic data) the population's modal reply.
  reference_reply: str = field("chosen", choices=("chosen", "base", "population_mode"))
  lambda_aux: float = field(0.0, low=0, resume=FREE)


@dataclasses.dataclass(frozen=True)
class PreferenceEvalSection(Section):
  KEY: ClassVar[str] = "preference.eval"
  # CA accuracy: the prompt mode, few-shot rows, and rows (0: the whole ca_eval split).
  ca_mode: str = field("persona", choices=CA_MODES, resume=FREE)
  ca_shots: int = field(3, low=1, resume=FREE)
  ca_rows: int = field(1000, low=0, resume=FREE)
  # Win-rate against the base model on the DPO test split's prompts (0: all of them).
  win_rate_prompts: int = field(0, low=0, resume=FREE)
  temperature: float = field(0.7, low=0, resume=FREE)
  top_p: float = field(0.9, low=0, low_open=True, high=1, resume=FREE)
  max_new_tokens: int = field(512, low=1, resume=FREE)
  swap_seed: int = field(0, resume=FREE)
  # "rule": the synthetic data's rule judge; "local_lm": a local causal LM (judge_checkpoint).
  judge: str = field("local_lm", choices=("rule", "local_lm"), resume=FREE)
  judge_checkpoint: str = field("", resume=FREE)
  judge_demonstrations: int = field(3, low=0, resume=FREE)  # solved DPO-train pairs shown
  # The judge's user turn: this project's, or the released evaluation's (its header line,
  # and the templated prompt as the context); docs/evaluation.md#preference-alignment.
  judge_prompt: str = field("project", choices=JUDGE_PROMPTS, resume=FREE)


@dataclasses.dataclass(frozen=True)
class PreferenceSection(Section):
  """The preference task: chat SFT (``train``/``optim`` settings), then DPO and GRPO."""

  KEY: ClassVar[str] = "preference"
  # Stages may be added to a finished run (e.g. GRPO after SFT and DPO); a stage's
  # checkpoints are compared with its own keys (the DPO and GRPO keys of the other stages
  # are not theirs).
  stages: tuple[str, ...] = field(("sft", "dpo"), choices=STAGES, resume=FREE)
  max_prompt_length: int = field(1024, low=1)
  max_completion_length: int = field(512, low=1)
  # How a chat SFT row longer than data.max_length is cut (docs/preference.md#batches).
  sft_truncation: str = field("prompt_start", choices=SFT_TRUNCATIONS)
  dpo: DpoSection = dataclasses.field(default_factory=DpoSection)
  grpo: GrpoSection = dataclasses.field(default_factory=GrpoSection)
  eval: PreferenceEvalSection = dataclasses.field(default_factory=PreferenceEvalSection)


@dataclasses.dataclass(frozen=True)
class MeshSection(Section):
  KEY: ClassVar[str] = "mesh"
  # Where parameters and activations live (docs/sharding.md): "dp" (replicated weights),
  # "fsdp" (weights and optimiser state split over the "fsdp" axis), "tp" (tensor
  # parallel over "model"), "fsdp_tp" (both); "custom" reads ``rules`` instead.
  rules_preset: str = field("dp", choices=(*RULES_PRESETS, "custom"), resume=FREE)
  # ((axis, size), ...) over the axes "slice", "data", "fsdp", "model" (absent ones have
  # size 1); one size may be -1 (all remaining devices).  () = the preset's own mesh.
  shape: tuple[tuple[str, int], ...] = field((), resume=FREE)
  # ((logical axis, mesh axis or None), ...), for rules_preset="custom" only.
  rules: tuple[tuple[str, Any], ...] = field((), resume=FREE)


@dataclasses.dataclass(frozen=True)
class DistributedSection(Section):
  """Multi-process runs (docs/sharding.md#multi-host): one process per host (TPU VM worker,
  GPU node or SLURM task), all running the same command."""

  KEY: ClassVar[str] = "distributed"
  # "auto": join when the environment is a multi-process launch (a TPU pod slice, SLURM
  # with several tasks, Open MPI) or a coordinator is given; "on": always; "off": never.
  initialize: str = field("auto", choices=("auto", "on", "off"), resume=FREE)
  # host:port of process 0 ("" = discovered from the environment).
  coordinator_address: str = field("", resume=FREE)
  num_processes: int = field(0, low=0, resume=FREE)  # 0 = from the environment
  process_id: int = field(-1, low=-1, resume=FREE)  # -1 = from the environment


@dataclasses.dataclass(frozen=True)
class Config(Section):
  """The whole experiment."""

  KEY: ClassVar[str] = ""
  task: str = field("survey", choices=TASKS)
  method: str = field("cuma", choices=METHODS)
  ablation: str = field("none", choices=ABLATIONS)
  mode: str = field("train", choices=("train", "eval"), resume=FREE)
  seed: int = field(0)
  trainable: str = field("adapters", choices=TRAINABLE_MODES)
  model: ModelSection = dataclasses.field(default_factory=ModelSection)
  encoder: EncoderSection = dataclasses.field(default_factory=EncoderSection)
  adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)
  data: DataSection = dataclasses.field(default_factory=DataSection)
  tiny_backbone: TinyBackboneSection = dataclasses.field(default_factory=TinyBackboneSection)
  optim: OptimSection = dataclasses.field(default_factory=OptimSection)
  train: TrainSection = dataclasses.field(default_factory=TrainSection)
  eval: EvalSection = dataclasses.field(default_factory=EvalSection)
  preference: PreferenceSection = dataclasses.field(default_factory=PreferenceSection)
  mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
  distributed: DistributedSection = dataclasses.field(default_factory=DistributedSection)


# A config as a caller gives it (a preset's ConfigDict, or a Config): the entry points
# validate it into the typed Config that everything below them reads.
ConfigLike: TypeAlias = ml_collections.ConfigDict | Config


def _section_types(cls) -> dict[str, type]:
  hints = typing.get_type_hints(cls)
  return {
    f.name: hints[f.name]
    for f in fields.config_fields(cls)
    if dataclasses.is_dataclass(hints[f.name])
  }


as_dict = fields.as_dict


def from_dict(values: dict, cls=Config, prefix: str = ""):
  """Builds (and so range-checks) the dataclass of ``values``; missing keys take defaults.

  A key the schema does not have is refused, naming it.
  """
  names = {f.name for f in fields.config_fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ValueError(
      f"config.{prefix}{unknown[0]} is not a config key; {cls.__name__} has {sorted(names)}"
    )
  sections = _section_types(cls)
  kwargs = {
    k: from_dict(v, sections[k], f"{prefix}{k}.") if k in sections else _tuples(v)
    for k, v in values.items()
  }
  return cls(**kwargs)


# Sections holding a variant's own parameters, and the key that names the variant: their
# keys are the parameters the variant declares (checked when the config is validated).
VARIANT_KWARGS = {"adapter.router_kwargs": "adapter.router", "adapter.gate_kwargs": "adapter.gate"}
_VARIANT_REGISTRIES: dict[str, Registry[Any]] = {
  "adapter.router_kwargs": ROUTERS,
  "adapter.gate_kwargs": GATES,
}


def variant_section(key: str) -> str | None:
  """The variant-parameters section that dotted ``key`` is or lies in (None: neither)."""
  return next((s for s in VARIANT_KWARGS if key == s or key.startswith(s + ".")), None)


def unknown_key(key: str) -> str | None:
  """Why dotted ``key`` (e.g. from ``--config.KEY=VALUE``) is not a config key, naming the
  closest ones; None when it is one (a variant's parameter is checked by validation)."""
  keys = _flat(as_dict(Config()))
  if key in keys or variant_section(key):
    return None
  close = (
    difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    or sorted(k for k in keys if k.startswith(key.split(".")[0] + "."))[:3]
  )
  return f"config.{key} is not a config key" + (f"; the closest are {close}" if close else "")


def help_texts() -> dict[str, str]:
  """``{dotted key: help}`` for every config key and every registered variant's parameter:
  the field's comment, its allowed values and its default (``--helpfull``)."""
  texts = {}

  def walk(cls, obj, prefix):
    notes, sections = fields.comments(cls), _section_types(cls)
    for f in fields.config_fields(cls):
      key, value = f"{prefix}{f.name}", getattr(obj, f.name)
      if f.name in sections:
        walk(sections[f.name], value, f"{key}.")
      else:
        texts[key] = notes.get(f.name, "") if key in VARIANT_KWARGS else _help(f, notes, value)

  walk(Config, Config(), "")
  for section, registry in _VARIANT_REGISTRIES.items():
    for name in registry.names():
      params = registry.get(name).params
      notes = fields.comments(params) if params else {}
      for f in dataclasses.fields(params) if params else ():
        key = f"{section}.{f.name}"
        text = f"{registry.kind} {name!r}: {_help(f, notes, getattr(params(), f.name))}"
        texts[key] = f"{texts[key]} | {text}" if key in texts else text
  return texts


def _help(f: dataclasses.Field, notes: dict[str, str], default: Any) -> str:
  spec = fields.spec_of(f)
  allowed = "" if spec == fields.Spec(resume=spec.resume) else f"{spec.describe()}; "
  return f"{notes.get(f.name, '')} ({allowed}default {default!r})".strip()


def defaults() -> ml_collections.ConfigDict:
  """The schema's defaults (the paper's Qwen3-8B recipe) as an unlocked ConfigDict."""
  return ml_collections.ConfigDict(as_dict(Config()))


def eval_splits_available(config: Config) -> tuple[str, ...]:
  if config.task == "preference":
    return EvalSection().splits  # not read: the preference splits are fixed
  if config.data.dataset == "wvb":
    return WVB_SPLITS[config.data.builder_config]
  return tuple(config.data.synthetic.split_sizes())


def validate(c: ConfigLike) -> Config:
  """Refuses impossible values, naming the key and what is allowed; returns the typed config
  that the runtime and the tasks read (a typed one is checked again: its sections check
  their own fields only).

  Every refusal is a :class:`~cuma_jax.errors.ConfigError`, also those of the checks a
  section's own class makes (the adapter's, the synthetic survey's)."""
  try:
    return _checked(as_dict(c) if isinstance(c, Config) else c.to_dict())
  except ValueError as error:
    if isinstance(error, errors.Refusal):
      raise
    raise errors.ConfigError(str(error)) from error


def _checked(values: dict) -> Config:
  config = from_dict(values)
  _check_task(config)
  available = eval_splits_available(config)
  missing = [s for s in config.eval.splits if s not in available]
  if missing or not config.eval.splits:
    raise ValueError(
      f"config.eval.splits={config.eval.splits}: {missing or 'empty'}; the "
      f"{config.data.dataset} dataset has the splits {available}"
    )
  if config.train.num_steps == 0 or (config.train.num_steps < 0 and config.train.num_epochs < 1):
    raise ValueError(
      f"config.train.num_steps={config.train.num_steps}, num_epochs={config.train.num_epochs}: "
      "set num_steps >= 1, or num_steps=-1 and num_epochs >= 1"
    )
  if config.method in config.eval.baselines:
    raise ValueError(
      f"config.eval.baselines={config.eval.baselines} holds the run's own method "
      f"{config.method!r}; list other methods"
    )
  _check_baseline_rates(config.eval)
  if config.method == "full" and config.trainable != "all":
    raise ValueError("config.method='full' needs config.trainable='all'")
  _check_encoder_keys(config.encoder)
  _check_mesh(config.mesh)
  encoder_is_tiny_backbone = (
    config.model.architecture == TINY
    and config.encoder.kind == "decoder"
    and not (config.model.checkpoint or config.encoder.checkpoint or config.encoder.precomputed)
  )
  if (
    config.method != "full"
    and config.adapter.uses_demographics
    and encoder_is_tiny_backbone
    and config.adapter.demographic_dim != config.tiny_backbone.hidden_size
  ):
    raise ValueError(
      f"config.adapter.demographic_dim={config.adapter.demographic_dim}, but the profile "
      f"encoder is the tiny backbone, of width tiny_backbone.hidden_size="
      f"{config.tiny_backbone.hidden_size}"
    )
  return config


# Keys a preference run does not read; set away from their defaults they are refused.
SURVEY_ONLY_KEYS = (
  "eval.splits",
  "eval.inequity_includes_country",
  "eval.untrained",
  "data.demographic_system_prompt",
  "data.builder_config",
  "data.synthetic.",
  "tiny_backbone.warmup",
)
# And the keys a survey run does not read.
PREFERENCE_ONLY_KEYS = ("data.split_mode", "data.synthetic_preference.", "preference.")


def _check_task(config: Config) -> None:
  """The dataset fits the task, and no key the task ignores is set."""
  datasets = PREFERENCE_DATASETS if config.task == "preference" else SURVEY_DATASETS
  if config.data.dataset not in datasets:
    raise ValueError(
      f"config.data.dataset={config.data.dataset!r} with task={config.task!r}; "
      f"that task reads {datasets}"
    )
  default, current = _flat(as_dict(Config())), _flat(as_dict(config))
  ignored = SURVEY_ONLY_KEYS if config.task == "preference" else PREFERENCE_ONLY_KEYS
  for key in sorted(current):
    read = not any(key == k or (k.endswith(".") and key.startswith(k)) for k in ignored)
    if not read and current[key] != default[key]:
      raise ValueError(
        f"config.{key}={current[key]!r} is not read by task={config.task!r}; reset it"
        + (
          " (a preference run's system turn always carries the profile; its evaluation is "
          "set in config.preference.eval)"
          if config.task == "preference"
          else ""
        )
      )
  if config.task == "survey":
    return
  stages = config.preference.stages
  if (
    not stages
    or len(set(stages)) != len(stages)
    or list(stages) != sorted(stages, key=STAGES.index)
  ):
    raise ValueError(f"config.preference.stages={stages}: distinct stages in the order {STAGES}")
  p = config.preference
  for key in ("max_prompt_length", "max_completion_length"):
    if getattr(p, key) >= config.data.max_length:
      raise ValueError(
        f"config.preference.{key}={getattr(p, key)} must be below "
        f"data.max_length={config.data.max_length}, leaving room for a prompt and a completion"
      )
  pe = p.eval
  if pe.judge == "rule" and config.data.dataset != "synthetic_preference":
    raise ValueError(
      "config.preference.eval.judge='rule' judges the synthetic preference data only; use "
      "'local_lm' with preference.eval.judge_checkpoint"
    )
  if pe.judge == "rule" and pe.judge_prompt != "project":
    raise ValueError(
      f"config.preference.eval.judge_prompt={pe.judge_prompt!r} is a local LM judge's prompt; "
      "the rule judge reads the conversation itself (judge_prompt='project')"
    )
  if config.preference.grpo.reference_reply == "population_mode" and (
    config.data.dataset != "synthetic_preference"
  ):
    raise ValueError(
      "config.preference.grpo.reference_reply='population_mode' exists for the synthetic "
      "preference data only; use 'chosen' or 'base'"
    )
  if config.data.split_mode == "reference" and config.data.dataset == "synthetic_preference":
    raise ValueError(
      "config.data.split_mode='reference' reproduces the released Community Alignment and "
      "PRISM splits; the synthetic preference data is split by conversation"
    )
  if config.encoder.kind == "fitted_ngrams" and config.data.dataset != "synthetic_preference":
    raise ValueError(
      "config.encoder.kind='fitted_ngrams' fits to answers with known options, which only the "
      "synthetic preference data has; use encoder.kind='decoder'"
    )


def _check_baseline_rates(e: EvalSection) -> None:
  """Each (method, rate) names a baseline of the run once, with a finite positive rate."""
  methods = [
    pair[0] if isinstance(pair, tuple) and len(pair) == 2 else None
    for pair in e.baseline_learning_rates
  ]
  for pair, method in zip(e.baseline_learning_rates, methods, strict=True):
    rate = pair[1] if method is not None else None
    if (
      method not in e.baselines
      or methods.count(method) > 1
      or not isinstance(rate, (int, float))
      or not 0 < rate < float("inf")
    ):
      raise ValueError(
        f"config.eval.baseline_learning_rates entry {pair!r}: each entry is (method, rate) "
        f"with a method of config.eval.baselines {e.baselines}, once, and a finite rate > 0"
      )


def _check_mesh(mesh: MeshSection) -> None:
  if (mesh.rules_preset == "custom") != bool(mesh.rules):
    raise ValueError(
      f"config.mesh.rules={mesh.rules!r} with mesh.rules_preset={mesh.rules_preset!r}: "
      "rules are read with rules_preset='custom' only, which needs them"
    )
  check_axis_names(mesh.shape)


# The encoder keys each kind reads; another kind's key set away from its default is refused.
_ENCODER_KEYS = {
  "decoder": ("checkpoint", "precomputed", "pooling", "max_length"),
  "fitted_ngrams": ("ridge",),
}


def _check_encoder_keys(encoder: EncoderSection) -> None:
  default = EncoderSection()
  for kind, keys in _ENCODER_KEYS.items():
    for key in set(keys) - set(_ENCODER_KEYS[encoder.kind]):
      value = getattr(encoder, key)
      if value != getattr(default, key):
        raise ValueError(
          f"config.encoder.{key}={value!r} is read by encoder.kind={kind!r} only, "
          f"but encoder.kind={encoder.kind!r}; reset it or choose kind {kind!r}"
        )


def with_variant_defaults(values: dict) -> dict:
  """A nested config dict whose variants' parameters are completed with their declared
  defaults (a variant that is not registered is left as it is)."""
  adapter = dict(values.get("adapter") or {})
  defaults = AdapterConfig()
  for section, name_key in VARIANT_KWARGS.items():
    key, name = section.split(".")[1], name_key.split(".")[1]
    variant = adapter.get(name, getattr(defaults, name))
    registry = _VARIANT_REGISTRIES[section]
    if variant in registry:
      kind = f"{registry.kind} {variant!r}"
      own = fields.params_of(registry.get(variant).params, adapter.get(key), section, kind)
      adapter[key] = as_dict(own)
  return {**values, "adapter": adapter} if "adapter" in values else values


def complete(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Writes the variants' parameters into ``c`` in full, defaults included, so that what a
  run records names every one; returns ``c``."""
  adapter = with_variant_defaults(c.to_dict())["adapter"]
  for section in VARIANT_KWARGS:
    key = section.split(".")[1]
    c.adapter[key] = adapter[key]
  return c


def adapter_config(config: Config) -> AdapterConfig | None:
  """The adapter the config injects (None for full fine-tuning)."""
  return None if config.method == "full" else config.adapter


def resume_class(key: str) -> str:
  """``fields.IDENTITY`` / ``STRUCTURAL`` / ``FREE`` for a dotted config key (a variant's
  parameter takes its section's class)."""
  key = variant_section(key) or key
  cls: type = Config
  *path, name = key.split(".")
  for part in path:
    cls = _section_types(cls)[part]
  return fields.spec_of({f.name: f for f in dataclasses.fields(cls)}[name]).resume


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": _tuples(v)})
  return out


def resume_conflicts(saved: dict, current: dict) -> list[str]:
  """The keys whose change between a checkpoint's config and this run's is refused.

  Each entry names the key, both values and why (identity or structural).  Keys the saved
  config lacks compare as their default; keys the schema no longer has are ignored.
  """
  default = _flat(as_dict(Config()))
  old, new = _flat(with_variant_defaults(saved)), _flat(with_variant_defaults(current))
  conflicts = []
  for key in sorted(set(new) | {k for k in old if variant_section(k)}):
    before, after = old.get(key, default.get(key)), new.get(key)
    if before != after and resume_class(key) != FREE:
      conflicts.append(f"{key}: {before!r} -> {after!r} ({resume_class(key)})")
  return conflicts
