"""Experiment configs: validation names the bad key, locked configs refuse misspelt keys."""

import ml_collections
import pytest

from cuma_jax import presets


def test_config_validation_names_the_key():
  c = ml_collections.ConfigDict(presets.experiment_config("cuma", "tiny").to_dict())
  for key, value, message in [
    ("adapter.top_k", 9, r"top_k"),
    ("optim.schedule", "step", r"optim\.schedule.*cosine"),
    ("data.dataset", "imagenet", r"data\.dataset.*synthetic"),
    ("encoder.pooling", "max", r"encoder\.pooling.*last_token"),
  ]:
    bad = ml_collections.ConfigDict(c.to_dict())
    parent, leaf = key.split(".")
    bad[parent][leaf] = value
    with pytest.raises(ValueError, match=message):
      presets.validate(bad)
  locked = presets.experiment_config("cuma", "tiny")
  with pytest.raises(AttributeError, match="learning_rte"):
    locked.optim.learning_rte = 1.0
