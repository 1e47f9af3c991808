"""The top-level package: its names are the API module's."""

import cuma_jax
from cuma_jax.models.pretrained import load_pretrained


def test_top_level_entry_point():
  assert cuma_jax.load_pretrained is load_pretrained
