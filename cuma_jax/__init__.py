"""cuma_jax: CuMA (Cultural Mixture of Adapters) in JAX/Flax.

``import cuma_jax`` is cheap: the library API (:mod:`cuma_jax.api`) is imported on first
use of one of its names, e.g. ``cuma_jax.run`` or ``cuma_jax.restore``.
"""

import importlib

# The one definition of the version: setup.cfg reads it (version = attr: cuma_jax.__version__).
__version__ = "0.1.0"

__all__ = [
  "Experiment",
  "build_decoder",
  "experiment_config",
  "export_adapters",
  "latent_culture",
  "load_pretrained",
  "load_tokenizer",
  "prepare",
  "profile_field",
  "restore",
  "routing_usage",
  "run",
  "save_pretrained",
  "usage_by_group",
]


def __getattr__(name):
  # Only the API's names: `from cuma_jax import schema` also asks, and must not load the API.
  if name in __all__:
    return getattr(importlib.import_module("cuma_jax.api"), name)
  raise AttributeError(f"module 'cuma_jax' has no attribute {name!r}")
