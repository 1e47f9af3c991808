"""The tasks on the runtime (:mod:`cuma_jax.runtime`), selected by ``config.task``.

A task is one module here defining a :class:`cuma_jax.runtime.Task` (its data, checkpoints,
profiles, warm-up batches, ``run`` and ``restore``), registered by one line in ``TASKS``
(docs/extending.md#adding-a-task). :func:`run` and :func:`restore` dispatch on the task.
"""

from __future__ import annotations

from cuma_jax import errors, runtime
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
  config, workdir: str, log=print, *, encoders: runtime.FittedEncoders | None = None
) -> runtime.Experiment:
  """Prepares data, backbone, model (adapters at their initialisation), tokenizer and
  demographics of a validated config as its task's experiment."""
  return runtime.prepare(config, workdir, get(config.task), log, encoders)


def run(config, workdir: str, log=print, *, encoders: runtime.FittedEncoders | None = None):
  """Trains and/or evaluates what ``config`` describes, by its task; returns the metrics it
  printed. ``encoders``: fitted demographic encoders to reuse across runs (one dataset)."""
  return get(config.task).run(config, workdir, log, encoders=encoders)


def restore(
  workdir: str, config=None, log=print, *, encoders: runtime.FittedEncoders | None = None
) -> runtime.Experiment:
  """The trained experiment of ``workdir``: its config (the latest checkpoint's, unless
  given), model, trained parameters, tokenizer, data and demographics. With a ``config``
  whose ``adapter.init_from`` is set, a survey workdir without checkpoints gives those
  adapters."""
  if config is None:
    config = saved_config(workdir)
  return get(config.task).restore(workdir, config, log, encoders=encoders)


def saved_config(workdir: str):
  """The config of ``workdir``'s latest checkpoint (of whichever task trained it), for
  evaluation; refused, creating nothing, when it has none."""
  searched = [d for task in TASKS.values() for d in task.checkpoint_dirs(workdir)]
  for directory in searched:
    if runtime.has_checkpoint(directory):
      return runtime.saved_config(directory)
  raise errors.MissingInput(f"{workdir} has no training checkpoint in {' or '.join(searched)}")
