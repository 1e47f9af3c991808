"""Named extension points: a research variant registers itself and a config value selects it.

A fork adds a gate, a router kind or a dispatch strategy in one file::

    from cuma_jax.layers import routing

    @routing.GATES.register("my_gate")
    def my_gate(top_logits, top_probs, temperature):
      ...

and selects it with ``--config.adapter.gate=my_gate``.  Each registry knows the config key
that selects from it, so an unknown name is refused naming that key and what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
import importlib
from typing import Generic, TypeVar

T = TypeVar("T")

# Bumped whenever any registry changes: caches of traced models key on it, so a variant
# registered again under the same name (a notebook cell run twice) is traced afresh.
_generation = 0


def generation() -> int:
  """How many times the registries have changed in this process."""
  return _generation


def _changed() -> None:
  global _generation
  _generation += 1


class Registry(Generic[T]):
  """A name -> entry table for one kind of extension point."""

  def __init__(self, kind: str, config_key: str):
    self.kind = kind
    self.config_key = config_key
    self._entries: dict[str, T] = {}

  def register(self, name: str, entry: T | None = None):
    """Registers ``entry`` under ``name``; without ``entry``, a decorator that does so."""

    def add(value: T) -> T:
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is already registered")
      self._entries[name] = value
      _changed()
      return value

    return add if entry is None else add(entry)

  def unregister(self, name: str) -> None:
    """Removes ``name`` (for tests and notebooks that re-run their registration)."""
    if name in self._entries:
      del self._entries[name]
      _changed()

  def check(self, name: str) -> None:
    if name not in self._entries:
      raise ValueError(
        f"config.{self.config_key}={name!r} is not a registered {self.kind}; registered: "
        f"{self.names()}; a variant defined in your own module is registered when that "
        "module is listed in config.adapter.plugins"
      )

  def get(self, name: str) -> T:
    self.check(name)
    return self._entries[name]

  def names(self) -> tuple[str, ...]:
    return tuple(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries


def import_plugins(modules: Sequence[str]) -> None:
  """Imports the modules of ``config.adapter.plugins``, whose variants register themselves on
  import: a fork's workdir then runs, evaluates and restores in a fresh process."""
  for name in modules:
    try:
      importlib.import_module(name)
    except Exception as e:
      reason = (str(e).strip().splitlines() or [""])[0]
      raise ValueError(
        f"config.adapter.plugins: cannot import {name!r} ({type(e).__name__}: {reason}); "
        "list modules importable from the working directory or PYTHONPATH"
      ) from e
