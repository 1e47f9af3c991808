"""cuma_jax: CuMA (Cultural Mixture of Adapters) in JAX/Flax.

``import cuma_jax`` is cheap: the names of :mod:`cuma_jax.api` are imported on first use.
"""

import importlib

__all__ = [
  "build_decoder",
  "experiment_config",
  "load_pretrained",
  "load_tokenizer",
  "run",
  "save_pretrained",
]


def __getattr__(name):
  if name in __all__:
    return getattr(importlib.import_module("cuma_jax.api"), name)
  raise AttributeError(f"module 'cuma_jax' has no attribute {name!r}")
