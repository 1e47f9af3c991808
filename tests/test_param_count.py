"""Trainable-parameter counts of the paper's configs, from jax.eval_shape."""

import pytest

from cuma_jax import param_count, presets


@pytest.mark.parametrize(
  "method, preset, percent",
  [
    ("cuma", "qwen3_8b_r8", 1.53),
    ("cuma", "qwen3_8b_r64", 4.15),
    ("hydralora", "qwen3_8b_r64", 2.31),
    ("lora", "qwen3_8b_r64", 0.37),
    ("mixlora", "qwen3_8b_r64", 3.01),
  ],
)
def test_trainable_percentages_reproduce_the_paper(method, preset, percent):
  counts = param_count.count_parameters(presets.experiment_config(method, preset))
  assert counts["backbone"] == 8_190_735_360
  assert round(counts["trainable_percent"], 2) == percent
