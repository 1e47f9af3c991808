"""Full-size architectures traced with jax.eval_shape: Hugging Face parameter counts."""

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

import cuma_jax
from cuma_jax.models.config import ModelConfig
from cuma_jax.models.pretrained import abstract_params, build_decoder

CONFIGS = os.path.join(os.path.dirname(cuma_jax.__file__), "architectures")


@pytest.mark.parametrize(
  "filename, output, expected",
  [
    ("qwen3-8b.json", "logits", 8_190_735_360),
    ("llama-3.1-8b.json", "logits", 8_030_261_248),
    ("qwen3-embedding-0.6b.json", "hidden_states", 595_776_512),
  ],
)
@pytest.mark.parametrize("scan_layers", [False, True])
def test_parameter_count_matches_hugging_face(filename, output, expected, scan_layers):
  config = ModelConfig.from_pretrained(os.path.join(CONFIGS, filename))
  module = build_decoder(config, output=output, scan_layers=scan_layers)
  shapes = nn.unbox(abstract_params(module))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == expected


def test_every_parameter_has_logical_axes():
  config = ModelConfig.from_pretrained(os.path.join(CONFIGS, "qwen3-8b.json"))
  boxed = abstract_params(build_decoder(config, scan_layers=True))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim
    assert "layers" not in leaf.names or leaf.names[0] == "layers"
