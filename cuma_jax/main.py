"""Runs one experiment: ``python -m cuma_jax.main --config=configs/cuma.py:demo --workdir=DIR``.

Thin on purpose: the work is in :mod:`cuma_jax.job` (a survey) and :mod:`cuma_jax.alignment`
(a preference task), importable from notebooks.
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
import jax
from ml_collections import config_flags

from cuma_jax import api, job, overrides, schema

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Experiment config file and preset, e.g. configs/cuma.py:qwen3_8b_r64. Without it, the "
  "workdir's recorded config (to evaluate or resume), changed by the --config.KEY overrides.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
flags.mark_flags_as_required(["workdir"])

# Libraries whose INFO chatter (every checkpoint write, every TFDS shard) drowns the job's own.
_CHATTY = ("/orbax/", "/tensorflow_datasets/", "/array_record/")


class _QuietLibraries(logging.Filter):
  def filter(self, record):
    return record.levelno >= logging.WARNING or not any(p in record.pathname for p in _CHATTY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())
  job.initialize_distributed(_CONFIG.value)
  # Every process runs the job; process 0 alone reports.
  log = print if jax.process_index() == 0 else _silent
  _, params, given = overrides.split_argv(sys.argv)
  changes = {**config_flags.get_override_values(flags.FLAGS["config"]), **params}
  config = overrides.resolve(_CONFIG.value, changes, _WORKDIR.value, config_given=given, log=log)
  api.run(config, _WORKDIR.value, log=log)


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
  absl_argv, _, _ = overrides.split_argv(argv)
  # config_flags reads its overrides from sys.argv; the user's stays for the run's record.
  typed, sys.argv = sys.argv, absl_argv
  try:
    return app.parse_flags_with_usage(absl_argv)
  finally:
    sys.argv = typed


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
