"""Refusals: a config or an input the run will not go on with, said in one message.

``python -m cuma_jax.main`` prints a refusal as one line and exits non-zero, with no
traceback: the message names what was wrong and what is allowed, which is all a person
needs (``--verbose`` or ``CUMA_TRACEBACK=1`` shows the traceback too). Any other exception is
a bug and keeps its traceback. Each refusal also derives from the builtin class its callers
catch (a :class:`ConfigError` is a ``ValueError``).
"""


class Refusal(Exception):
  """Base of every refusal; mix it into an error class whose message is for the user."""


class ConfigError(Refusal, ValueError):
  """A config value out of its range, or at odds with another; the message names the key."""


class MissingInput(Refusal, FileNotFoundError):
  """Something the config names, or the run needs, is not where it should be."""
