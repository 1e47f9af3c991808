"""Runs one experiment: ``python -m cuma_jax.main --config=configs/cuma.py:demo --workdir=DIR``.

Thin on purpose: the work is in :mod:`cuma_jax.runtime` and the task it runs
(:mod:`cuma_jax.tasks`), importable from notebooks.
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
import jax
from ml_collections import config_flags

from cuma_jax import api, runtime, schema

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Experiment config file and preset, e.g. configs/cuma.py:qwen3_8b_r64.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
flags.mark_flags_as_required(["config", "workdir"])

# Libraries whose INFO chatter (every checkpoint write, every TFDS shard) drowns the job's own.
_CHATTY = ("/orbax/", "/tensorflow_datasets/", "/array_record/")


class _QuietLibraries(logging.Filter):
  def filter(self, record):
    return record.levelno >= logging.WARNING or not any(p in record.pathname for p in _CHATTY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG.value
  runtime.initialize_distributed(config)
  # Every process runs the job; process 0 alone reports.
  api.run(config, _WORKDIR.value, log=print if jax.process_index() == 0 else _silent)


def _silent(*_):
  pass


def parse_flags(argv):
  """absl's parser, after refusing an unknown ``--config.KEY`` in one line (ml_collections
  raises a bare ``AttributeError`` naming only its last part)."""
  for arg in argv[1:]:
    if arg.startswith("--config."):
      problem = schema.unknown_key(arg[len("--config.") :].split("=")[0])
      if problem:
        sys.stderr.write(f"FATAL Flags parsing error: {arg}: {problem}\n")
        sys.exit(1)
  return app.parse_flags_with_usage(argv)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
