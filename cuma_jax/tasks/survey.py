"""The survey task end to end: data, backbone, demographic table, training, evaluation.

:func:`run` trains and evaluates what a ``task="survey"`` config describes; :func:`restore`
gives a trained workdir back as an :class:`Experiment` (model, parameters, tokenizer, data,
demographics) for analysis. What it shares with every task is in :mod:`cuma_jax.runtime`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import cast

import jax

from cuma_jax import errors, runtime, schema
from cuma_jax.data import builders, profile_questions, prompts
from cuma_jax.data.pipeline import SurveyTables, as_text, make_dataset
from cuma_jax.data.tokenize import ChatEncoder
from cuma_jax.encoders import Demographics
from cuma_jax.evaluation.survey import evaluate
from cuma_jax.params import merge_params
from cuma_jax.training import checkpointing, loop
from cuma_jax.training.workdir import WorkdirLock, check_workdir_path


def load_data(config: schema.Config, workdir: str, log=print) -> runtime.Data:
  """Opens the TFDS array_record dataset the config names, prepared once per input contents."""
  data_dir = config.data.data_dir or os.path.join(workdir, "tfds")
  builder = runtime.process_zero_first(
    "prepare the dataset", lambda: builders.prepared_builder(config.data, data_dir, log)
  )
  sources = builder.as_data_source()
  oracle = builders.load_oracle(sources["test"]) if config.data.dataset == "synthetic" else None
  for split, source in sources.items():
    if len(source) == 0:
      raise ValueError(f"dataset split {split!r} has no valid rows")
  return runtime.Data(sources=dict(sources), oracle=oracle, directory=str(builder.data_dir))


def demographic_table(demographics: Demographics | None, tables: SurveyTables):
  """[num_profiles, d] router inputs of a split's sorted distinct profiles (or None)."""
  return None if demographics is None else demographics.encode(tables.profiles)


@dataclasses.dataclass
class Experiment(runtime.Experiment):
  """What a survey run is made of: returned by :func:`prepare` (adapters at their
  initialisation) and :func:`restore` (the trained adapters of a workdir)."""

  train_tables: SurveyTables = dataclasses.field(init=False)

  def __post_init__(self):
    self.train_tables = SurveyTables.of(self.data.sources["train"])

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


def prepare(
  config: schema.Config, workdir: str, log=print, *, encoders: runtime.FittedEncoders | None = None
) -> Experiment:
  """Prepares data, backbone, model, tokenizer and demographics of a validated config, after
  refusing a workdir whose checkpoints came from other inputs (before any model loads)."""
  # runtime.prepare builds the task's experiment_type, this module's Experiment.
  return cast(Experiment, runtime.prepare(config, workdir, TASK, log, encoders))


def run(
  config: schema.ConfigLike,
  workdir: str,
  log=print,
  *,
  encoders: runtime.FittedEncoders | None = None,
):
  """Trains (``config.mode == 'train'``) and/or evaluates; returns the metrics it printed.

  The cheap checks come first and write nothing: the config, the workdir's checkpoints being
  of it, and for mode=eval their existence. The workdir is then locked for the rest of the
  run. ``encoders``: fitted demographic encoders to reuse (the run's baselines share them).
  """
  config = runtime.validate(config, TASK)
  if config.task != "survey":
    raise errors.ConfigError(
      f"config.task={config.task!r} is not the survey task; cuma_jax.run (and python -m "
      "cuma_jax.main) runs each config by its task"
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
    return _run(config, workdir, log, encoders or runtime.FittedEncoders())


def _run(config: schema.Config, workdir: str, log, encoders, *, baseline: bool = False) -> dict:
  experiment = prepare(config, workdir, log, encoders=encoders)
  results = {}
  if config.mode == "train" and config.eval.untrained:
    results["untrained"] = _evaluate_all(experiment)
    _report("untrained", results["untrained"], log)
  if config.mode == "train":
    experiment.params = _train(experiment, log)
  else:
    experiment.params = _trained_params(experiment, log)
  exports = runtime.export(config, workdir, experiment.params, log)
  results["trained"] = _evaluate_all(experiment)
  _report(config.method if baseline else "trained", results["trained"], log, models_only=baseline)
  for method in config.eval.baselines:
    results.setdefault("baselines", {})[method] = _run_baseline(experiment, method, encoders, log)
  runtime.write_results(config, workdir, results, exports, log)
  return results


def _run_baseline(experiment: Experiment, method: str, encoders, log) -> dict:
  """Trains (or restores) and evaluates ``method`` the way the experiment was trained."""
  baseline, workdir = runtime.baseline_of(experiment, method)
  log(f"baseline {method}: the same data, backbone, steps and optimiser, in {workdir}")
  with WorkdirLock(workdir, enabled=jax.process_index() == 0, log=log):
    return _run(baseline, workdir, log, encoders, baseline=True)["trained"]


def restore(
  workdir: str,
  config: schema.ConfigLike,
  log=print,
  *,
  encoders: runtime.FittedEncoders | None = None,
) -> Experiment:
  """The trained experiment of ``workdir`` run with ``config``: model, trained parameters,
  tokenizer, data and demographics. With ``adapter.init_from`` set, a workdir without
  checkpoints gives those adapters."""
  if not config.adapter.init_from and not runtime.has_checkpoint(_checkpoint_dir(workdir)):
    raise errors.MissingInput(f"{workdir} has no training checkpoint in {_checkpoint_dir(workdir)}")
  config = runtime.validate(config, TASK)
  experiment = prepare(config, workdir, log, encoders=encoders)
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


def _trained_params(experiment: Experiment, log=print) -> dict:
  """The newest readable checkpoint's trainable parameters over the loaded backbone (or,
  without checkpoints, the adapters ``adapter.init_from`` gave the model)."""
  directory = _checkpoint_dir(experiment.workdir)
  if experiment.config.adapter.init_from and not runtime.has_checkpoint(directory):
    return experiment.params
  params = runtime.trained_params(
    experiment, directory, inputs=experiment.inputs, conflicts=schema.resume_conflicts, log=log
  )
  if params is None:
    raise errors.MissingInput(f"{directory} has no training checkpoint to evaluate")
  return params


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


def _check_checkpoints(config: schema.Config, workdir: str, inputs: dict) -> None:
  checkpointing.check_workdir(
    config, _checkpoint_dir(workdir), inputs, config_conflicts=schema.resume_conflicts
  )


def _profiles(source) -> tuple[str, ...]:
  return SurveyTables.of(source).profiles


def _answers(train_source) -> list[tuple[str, str, int]]:
  records = train_source.__getitems__(range(len(train_source)))
  return [
    (as_text(r["profile"]), as_text(r["question_id"]), int(r["answer_option"])) for r in records
  ]


def _warmup_corpus(data: runtime.Data):
  """Every text the prompts are made of: questions/options, profiles, system prompts."""
  source = data.sources["train"]
  for question in source.dataset_info.metadata["questions"]:
    yield question["text"] + " " + " ".join(question["option_texts"])
  yield from SurveyTables.of(source).profiles
  yield prompts.DEFAULT_SYSTEM_PROMPT
  yield prompts.INSTRUCTION


def _warmup_description(warm: schema.Config) -> str:
  reading = warm.tiny_backbone.warmup == "profile_reading"
  return "on the survey without profiles" + (
    ", mixed with questions about each profile's own fields" if reading else ""
  )


def _warmup_batches(warm: schema.Config, data: runtime.Data, tokenizer, module):
  """The survey WITHOUT profiles in the prompt: the backbone learns the answer format and the
  population's answers (mean collapse). With ``tiny_backbone.warmup="profile_reading"``,
  questions about each training profile's own fields, asked under that profile, are mixed
  in: it also learns to read a profile, never what it implies for the survey."""
  del module  # the SFT objective
  train = data.sources["train"]
  reading = warm.tiny_backbone.warmup == "profile_reading"
  questions = _profile_questions(train) if reading else None
  dataset, _ = make_dataset(
    train,
    tokenizer,
    # Never cut a profile question's prompt: its first tokens are the profile it asks about.
    max_length=max(
      warm.data.max_length, 0 if questions is None else _longest(questions, tokenizer)
    ),
    batch_size=warm.data.batch_size,
    seed=warm.data.shuffle_seed,
    num_epochs=None,
    demographic_system_prompt=False,
    profile_questions=questions,
  )
  return dataset, None


def _profile_questions(train_source) -> profile_questions.ProfileQuestions:
  """Questions about the training profiles' own fields."""
  records = train_source.__getitems__(range(len(train_source)))
  return profile_questions.ProfileQuestions(profile_questions.profile_fields(records))


def _longest(questions: profile_questions.ProfileQuestions, tokenizer) -> int:
  """Tokens of the longest profile question with its answer."""
  encoder = ChatEncoder(tokenizer, max_length=1)
  lengths = (encoder.tokens(prompts.chat_messages(q.system, q.user), q.answer) for q in questions)
  return max(len(prompt) + len(answer) for prompt, answer in lengths)


class Survey(runtime.Task):
  """``task="survey"``: SFT on survey answers, scored on held-out answers."""

  experiment_type = Experiment
  train_split = "train"
  load_data = staticmethod(load_data)
  check_checkpoints = staticmethod(_check_checkpoints)
  profiles = staticmethod(_profiles)
  answers = staticmethod(_answers)
  warmup_corpus = staticmethod(_warmup_corpus)
  warmup_description = staticmethod(_warmup_description)
  warmup_batches = staticmethod(_warmup_batches)
  run = staticmethod(run)
  restore = staticmethod(restore)

  @staticmethod
  def checkpoint_dirs(workdir: str) -> tuple[str, ...]:
    return (_checkpoint_dir(workdir),)


TASK = Survey()
