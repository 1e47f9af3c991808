"""The tasks on the runtime (:mod:`cuma_jax.runtime`), selected by ``config.task``.

A task is one module here defining a :class:`cuma_jax.runtime.Task` (its data, checkpoints,
profiles, warm-up batches, ``run`` and ``restore``), registered by one line in ``TASKS``
(docs/extending.md#adding-a-task). :func:`run` and :func:`restore` dispatch on the task.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from cuma_jax import errors, overrides, runtime, schema
from cuma_jax.tasks import preference, survey

TASKS: dict[str, runtime.Task] = {
  "survey": survey.TASK,
  "preference": preference.TASK,
}


def get(name: str) -> runtime.Task:
  if name not in TASKS:
    raise errors.ConfigError(
      f"config.task={name!r} is not a registered task; registered: {tuple(TASKS)}"
    )
  return TASKS[name]


def prepare(
  config: schema.ConfigLike,
  workdir: str,
  log=print,
  *,
  encoders: runtime.FittedEncoders | None = None,
) -> runtime.Experiment:
  """Prepares data, backbone, model (adapters at their initialisation), tokenizer and
  demographics of ``config`` (validated first) as its task's experiment."""
  task = get(config.task)
  return runtime.prepare(runtime.validate(config, task), workdir, task, log, encoders)


def run(
  config: schema.ConfigLike,
  workdir: str,
  log=print,
  *,
  encoders: runtime.FittedEncoders | None = None,
):
  """Trains and/or evaluates what ``config`` describes, by its task; returns the metrics it
  printed. ``encoders``: fitted demographic encoders to reuse across runs (one dataset)."""
  return get(config.task).run(config, workdir, log, encoders=encoders)


def restore(
  workdir: str,
  config: schema.ConfigLike | None = None,
  log=print,
  *,
  encoders: runtime.FittedEncoders | None = None,
) -> runtime.Experiment:
  """The trained experiment of ``workdir``: its config (the latest checkpoint's, unless
  given), model, trained parameters, tokenizer, data and demographics. With a ``config``
  whose ``adapter.init_from`` is set, a survey workdir without checkpoints gives those
  adapters."""
  if config is None:
    config = saved_config(workdir)
  return get(config.task).restore(workdir, config, log, encoders=encoders)


def checkpoint_dirs(workdir: str) -> list[str]:
  """Where the tasks keep checkpoints in ``workdir``, each task's furthest-trained first."""
  return [d for task in TASKS.values() for d in task.checkpoint_dirs(workdir)]


def recorded_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The config that ``workdir``'s latest checkpoint recorded (the furthest-trained stage's,
  of whichever task trained it), completed with the schema's defaults and its
  ``adapter.plugins`` imported; None when it has no checkpoint. What ``python -m
  cuma_jax.main`` starts from without ``--config``, and what :func:`restore` evaluates."""
  for directory in checkpoint_dirs(workdir):
    if runtime.has_checkpoint(directory):
      return overrides.config_of(directory)
  return None


def saved_config(workdir: str) -> schema.Config:
  """The recorded config of ``workdir`` (:func:`recorded_config`) for evaluation; refused,
  creating nothing, when it has none."""
  recorded = recorded_config(workdir)
  if recorded is None:
    raise errors.MissingInput(
      f"{workdir} has no training checkpoint in {' or '.join(checkpoint_dirs(workdir))}"
    )
  return dataclasses.replace(schema.validate(recorded), mode="eval")
