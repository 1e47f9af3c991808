"""Command-line overrides, applied over a config file's preset or over a workdir's recorded
config.

``python -m cuma_jax.main --workdir=DIR --config.mode=eval`` (no ``--config``) evaluates or
resumes DIR with the config its latest checkpoint recorded (``cuma_jax.tasks.recorded_config``,
which ``cuma_jax.main`` passes here): only what changes is given, as
``--config.KEY=VALUE``, and the resume check classes those changes as ever (a key that
defines the experiment is refused, a free one is taken).  With ``--config=FILE:PRESET`` the
file's preset is the base, as before.

absl's config flag cannot add a key to a locked config, so a variant's parameters
(``--config.adapter.router_kwargs.NAME=VALUE``) are taken out of the command line here and
applied with the other overrides.  This file is also the config file read when ``--config``
is not given (:func:`get_config`: the schema's defaults, which only carry the overrides).
"""

from __future__ import annotations

import ast
import os
import re
from typing import Any

import ml_collections

from cuma_jax import errors, presets, registry, schema
from cuma_jax.training import checkpointing

DEFAULT_CONFIG = os.path.abspath(__file__)
_CONFIG_ARG = re.compile(r"^--?config(=|$)")
_VARIANT_ARGS = tuple(f"--config.{section}." for section in schema.VARIANT_KWARGS)


def get_config() -> ml_collections.ConfigDict:
  """The config file's ``get_config`` when ``--config`` is not given."""
  return schema.defaults()


def split_argv(argv: list[str]) -> tuple[list[str], dict[str, Any], bool]:
  """(the arguments for absl, the variants' parameters they set, whether ``--config`` is
  given).  Without ``--config``, absl's arguments name :data:`DEFAULT_CONFIG`."""
  rest, params = [], {}
  args = iter(argv)
  for arg in args:
    if not arg.startswith(_VARIANT_ARGS):
      rest.append(arg)
      continue
    key, _, value = arg[len("--config.") :].partition("=")
    params[key] = _literal(value if "=" in arg else next(args, ""))
  given = any(_CONFIG_ARG.match(arg) for arg in rest[1:])
  if not given:
    rest.insert(1, f"--config={DEFAULT_CONFIG}")
  return rest, params, given


def help_flags(argv: list[str]) -> dict[str, str]:
  """``{--config.KEY flag name: help}`` for ``--helpfull``, after importing the plugins that
  ``argv`` lists (``--config.adapter.plugins=...``), so that their variants' parameters show."""
  for arg in argv:
    if arg.startswith("--config.adapter.plugins="):
      plugins = _literal(arg.partition("=")[2])
      registry.import_plugins((plugins,) if isinstance(plugins, str) else plugins)
  return {f"config.{key}": text for key, text in schema.help_texts().items()}


def _literal(text: str) -> Any:
  """A command-line value as config_flags reads a new key's: a Python literal, else text."""
  if text in ("true", "false"):
    return text == "true"
  try:
    return ast.literal_eval(text)
  except (SyntaxError, ValueError):
    return text


def config_of(directory: str) -> ml_collections.ConfigDict:
  """The config of the newest checkpoint in ``directory``, completed with the schema's
  defaults (its ``adapter.plugins`` imported)."""
  ckpt = checkpointing.TrainCheckpoints(directory, config_json={}, read_only=True)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise errors.MissingInput(f"{directory} holds no finished checkpoint to read the config from")
    saved = ckpt.saved_config(step)
  finally:
    ckpt.close()
  return ml_collections.ConfigDict(schema.as_dict(schema.from_dict(saved)))


def resolve(
  base: ml_collections.ConfigDict | None,
  overrides: dict[str, Any],
  workdir: str,
  *,
  from_workdir: bool,
  log=print,
) -> ml_collections.ConfigDict:
  """The locked, validated config a command line runs: ``base`` with ``overrides`` (dotted
  keys) set. ``base`` is the file's preset, or with ``from_workdir`` (``--config`` not
  given) WORKDIR's recorded config (``cuma_jax.tasks.recorded_config``; None: it has none)."""
  if base is None:  # only without --config
    raise errors.ConfigError(
      f"--config is not given and {workdir} holds no checkpoint whose config a run could "
      "start from; give --config=FILE:PRESET (e.g. configs/cuma.py:tiny)"
    )
  if from_workdir:
    changes = ", ".join(f"{k}={v!r}" for k, v in overrides.items()) or "none"
    log(f"starting from the config recorded in {workdir}; command-line changes: {changes}")
  c = presets.apply_overrides(ml_collections.ConfigDict(base.to_dict()), overrides)
  schema.validate(c)
  return schema.complete(c).lock()
