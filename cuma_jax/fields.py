"""Configuration fields that carry their own allowed range, and one check that applies them.

Every configurable dataclass of the package (the adapter, the synthetic survey, each config
section) declares its fields with :func:`field`; :func:`check` walks them and refuses a value
out of range, naming the config key and what is allowed.  The schema test walks the same
metadata and tries an out-of-range value for every numeric field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import inspect
import io
import math
import re
import tokenize
import typing
from typing import Any

from cuma_jax import errors

# How a field may change when a run resumes from a checkpoint written with another value.
IDENTITY = "identity"  # defines the experiment: a change is refused
STRUCTURAL = "structural"  # changes the checkpoint's tree (optimiser state): refused
FREE = "free"  # where files live, memory and logging knobs, evaluation settings


@dataclasses.dataclass(frozen=True)
class Spec:
  """What values a field allows.  ``choices`` is a tuple or a callable returning one (so
  a registry's names are read when the check runs, after a fork registered its own);
  for a tuple-valued field, ``low``/``high``/``choices`` apply to each item."""

  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None
  resume: str = IDENTITY

  def allowed(self) -> tuple[Any, ...] | None:
    if self.choices is None:
      return None
    return tuple(self.choices() if callable(self.choices) else self.choices)

  def describe(self, finite: bool = False) -> str:
    """The allowed values in words (``finite``: say that they are, for a float field)."""
    parts = ["finite"] if finite else []
    if self.low is not None:
      parts.append(f"{'>' if self.low_open else '>='} {self.low}")
    if self.high is not None:
      parts.append(f"{'<' if self.high_open else '<='} {self.high}")
    if self.choices is not None:
      parts.append(f"one of {self.allowed()}")
    return " and ".join(parts) or "any value"

  def accepts(self, value: Any) -> bool:
    if isinstance(value, (tuple, list)):
      return all(self.accepts(v) for v in value)
    allowed = self.allowed()
    if allowed is not None and value not in allowed:
      return False
    if isinstance(value, float) and not math.isfinite(value):
      return False  # inf or nan would train to a non-finite state (every float is finite)
    if self.low is None and self.high is None:
      return True
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return False
    if self.low is not None and (value <= self.low if self.low_open else value < self.low):
      return False
    return not (
      self.high is not None and (value >= self.high if self.high_open else value > self.high)
    )


def field(default: Any, **spec) -> Any:
  """A dataclass field with a :class:`Spec` (``low``, ``high``, ``choices``, ``resume``)."""
  metadata = {"spec": Spec(**spec)}
  if isinstance(default, (list, dict, set)):
    raise TypeError("mutable defaults are not allowed; use a tuple")
  return dataclasses.field(default=default, metadata=metadata)


def spec_of(f: dataclasses.Field) -> Spec:
  return f.metadata.get("spec", Spec())


def check(obj: Any, prefix: str) -> None:
  """Refuses (a ConfigError, a ValueError) the first field of dataclass ``obj`` outside its
  Spec."""
  for f in dataclasses.fields(obj):
    spec = spec_of(f)
    value = getattr(obj, f.name)
    if not spec.accepts(value):
      key = f"{prefix}.{f.name}" if prefix else f.name
      raise errors.ConfigError(
        f"config.{key}={value!r}; must be {spec.describe(_has_float(value))}"
      )


def config_fields(cls) -> tuple[dataclasses.Field, ...]:
  """The fields of dataclass ``cls`` that are config keys (metadata ``config=False`` opts a
  field out, e.g. a dtype set by the code rather than the user)."""
  return tuple(f for f in dataclasses.fields(cls) if f.metadata.get("config", True))


def as_dict(obj: Any) -> dict:
  """A configurable dataclass as the nested dict of its config keys (what a run records)."""
  return {
    f.name: as_dict(v) if dataclasses.is_dataclass(v := getattr(obj, f.name)) else v
    for f in config_fields(type(obj))
  }


def _has_float(value: Any) -> bool:
  """Whether ``value`` is, or holds at any depth, a float."""
  if isinstance(value, (tuple, list)):
    return any(_has_float(v) for v in value)
  return isinstance(value, float)


@dataclasses.dataclass(frozen=True)
class NoParams:
  """The parameters of a variant that declares none of its own."""


def params_of(cls: type | None, values: Any, key: str, owner: str) -> Any:
  """The frozen dataclass ``cls`` (the parameters of variant ``owner``) from ``values``.

  ``values``: a mapping of field names (``config.<key>``), an instance of ``cls``, or None
  (the defaults).  A name ``cls`` lacks is refused naming those it has; each field is
  range-checked as :func:`check` does, then ``cls.validate()`` runs where it is defined.
  """
  cls = cls or NoParams
  if not isinstance(values, cls):
    given = _asdict(values)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(given) - set(names))
    if unknown:
      raise ValueError(f"config.{key}.{unknown[0]} is not a parameter of {owner}; it has {names}")
    hints = typing.get_type_hints(cls)
    values = cls(**{k: _coerce(v, hints[k], f"{key}.{k}") for k, v in given.items()})
  check(values, key)
  if hasattr(values, "validate"):
    values.validate()
  return values


def _asdict(values: Any) -> dict:
  if values is None:
    return {}
  if dataclasses.is_dataclass(values):
    return {f.name: getattr(values, f.name) for f in dataclasses.fields(values)}
  return dict(values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
  """``value`` as the field's declared type: an int where a float is declared becomes a
  float, a list a tuple; a value of another scalar type is refused."""
  if isinstance(value, list):
    value = tuple(value)
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  scalar = hint if hint in (bool, int, float, str) else None
  if scalar is not None and (
    not isinstance(value, scalar) or (scalar is int and isinstance(value, bool))
  ):
    raise ValueError(f"config.{key}={value!r}; must be of type {scalar.__name__}")
  return value


def comments(cls: type) -> dict[str, str]:
  """Each field's comment in ``cls``'s source: the comment lines just above the field and the
  one ending its line.  They are the fields' help texts (``--helpfull``); {} without source."""
  try:
    lines, _ = inspect.getsourcelines(cls)
  except (OSError, TypeError):
    return {}
  names = {f.name for f in dataclasses.fields(cls)}
  found, above, indent = {}, [], None
  for line in lines[1:]:
    text = line.strip()
    if text.startswith("#"):
      above.append(text[1:].strip())
      continue
    name = re.match(r"(\w+)\s*:", text)
    depth = len(line) - len(line.lstrip())
    if name and name.group(1) in names and indent in (None, depth):
      indent = depth
      found[name.group(1)] = " ".join([*above, _trailing_comment(line)]).strip()
    above = []
  return found


def _trailing_comment(line: str) -> str:
  """The comment ending one source line ("" when none), read by Python's tokenizer."""
  try:
    for token in tokenize.generate_tokens(io.StringIO(line).readline):
      if token.type == tokenize.COMMENT:
        return token.string[1:].strip()
  except tokenize.TokenError:  # the line opens a bracket that a later line closes
    pass
  return ""
