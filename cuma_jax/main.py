"""Runs one experiment: ``python -m cuma_jax.main --config=configs/cuma.py:demo --workdir=DIR``.

Thin on purpose: the work is in :mod:`cuma_jax.runtime` and the task it runs
(:mod:`cuma_jax.tasks`), importable from notebooks.
"""

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
import jax
from ml_collections import config_flags
import tensorflow_datasets as tfds

from cuma_jax import api, errors, overrides, platforms, runtime, schema, tasks

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Experiment config file and preset, e.g. configs/cuma.py:qwen3_8b_r64. Without it, the "
  "workdir's recorded config (to evaluate or resume), changed by the --config.KEY overrides.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Where checkpoints, metrics and results go.", required=True
)
# Set to anything but 0 to show a refusal's traceback (as --verbose does).
TRACEBACK_ENV = "CUMA_TRACEBACK"
_VERBOSE = flags.DEFINE_bool(
  "verbose",
  False,
  f"Show the traceback of a refused config or input too (or set {TRACEBACK_ENV}=1); "
  "without it a refusal is one line.",
)

# Libraries whose INFO chatter (every checkpoint write, every TFDS shard) drowns the job's own.
_CHATTY = ("/orbax/", "/tensorflow_datasets/", "/array_record/")
# Library warnings about what they do by design here, which a user cannot act on:
# (where they come from, how their message starts).
_UNACTIONABLE = (
  # Every builder config of ours is "custom": named by a digest of the data's inputs.
  ("/tensorflow_datasets/", "Using custom data configuration"),
  # "... has no dataset_info.json": a dataset not prepared yet, which the run then prepares.
  ("/tensorflow_datasets/", "Variant folder"),
)


class _QuietLibraries(logging.Filter):
  """Drops libraries' INFO chatter and their warnings that a user cannot act on."""

  def filter(self, record):
    if record.levelno < logging.WARNING:
      return not any(p in record.pathname for p in _CHATTY)
    return not any(
      p in record.pathname and record.getMessage().startswith(m) for p, m in _UNACTIONABLE
    )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())
  if not sys.stderr.isatty():
    # TFDS redraws a bar per split and per shard: in a log file, lines of escape sequences.
    tfds.disable_progress_bar()
  try:
    runtime.initialize_distributed(_CONFIG.value)
    # Every process runs the job; process 0 alone reports.
    log = print if jax.process_index() == 0 else _silent
    _, params, given = _PARSED_ARGV
    changes = {**config_flags.get_override_values(flags.FLAGS["config"]), **params}
    base = _CONFIG.value if given else tasks.recorded_config(_WORKDIR.value)
    config = overrides.resolve(base, changes, _WORKDIR.value, from_workdir=not given, log=log)
    api.run(config, _WORKDIR.value, log=log)
  except errors.Refusal as refusal:
    if _VERBOSE.value or os.environ.get(TRACEBACK_ENV, "0") not in ("", "0"):
      raise
    sys.stderr.write(f"{type(refusal).__name__}: {refusal}\n")
    sys.exit(1)


# What parse_flags split the command line into (absl's arguments, the variants' parameters,
# whether --config was given): main reads the line parse_flags read, not sys.argv.
_PARSED_ARGV: tuple = ([], {}, True)


def _silent(*_):
  pass


def parse_flags(argv):
  """absl's parser, after refusing an unknown ``--config.KEY`` in one line (ml_collections
  raises a bare ``AttributeError`` naming only its last part), on the arguments absl reads
  (:func:`cuma_jax.overrides.split_argv`)."""
  for arg in argv[1:]:
    if arg.startswith("--config."):
      problem = schema.unknown_key(arg[len("--config.") :].split("=")[0])
      if problem:
        sys.stderr.write(f"FATAL Flags parsing error: {arg}: {problem}\n")
        sys.exit(1)
  if any(arg.lstrip("-").startswith("help") for arg in argv[1:]):
    # Each config key as a flag (set by config_flags' own when given), for its help text.
    for name, text in overrides.help_flags(argv).items():
      flags.DEFINE_string(name, None, text, allow_override=True)
  global _PARSED_ARGV
  _PARSED_ARGV = overrides.split_argv(argv)
  absl_argv = _PARSED_ARGV[0]
  # config_flags reads its overrides from sys.argv; the user's stays for the run's record.
  typed, sys.argv = sys.argv, absl_argv
  try:
    return app.parse_flags_with_usage(absl_argv)
  finally:
    sys.argv = typed


if __name__ == "__main__":
  platforms.skip_absent_tpu()
  app.run(main, flags_parser=parse_flags)
