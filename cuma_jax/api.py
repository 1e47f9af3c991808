"""The library API a script or notebook lives on (the top of the package).

Loading a backbone, running the experiment a config describes, and getting a trained
workdir back as objects, without the command line.
"""

from __future__ import annotations

from cuma_jax.job import run
from cuma_jax.models.pretrained import (
  build_decoder,
  load_pretrained,
  load_tokenizer,
  save_pretrained,
)
from cuma_jax.presets import experiment_config

__all__ = [
  "build_decoder",
  "experiment_config",
  "load_pretrained",
  "load_tokenizer",
  "run",
  "save_pretrained",
]
