"""Trainable-parameter counts of the paper's configs, from jax.eval_shape."""

import pytest

from cuma_jax import param_count, presets


@pytest.mark.parametrize(
  "method, preset, percent",
  [
    ("cuma", "qwen3_8b_r8", 1.53),
    *(
      pytest.param(*case, marks=pytest.mark.slow)
      for case in (
        ("cuma", "qwen3_8b_r64", 4.15),
        ("hydralora", "qwen3_8b_r64", 2.31),
        ("lora", "qwen3_8b_r64", 0.37),
        ("mixlora", "qwen3_8b_r64", 3.01),
      )
    ),
  ],
)
def test_trainable_percentages_reproduce_the_paper(method, preset, percent):
  counts = param_count.count_parameters(presets.experiment_config(method, preset))
  assert counts["backbone"] == 8_190_735_360
  assert round(counts["trainable_percent"], 2) == percent


@pytest.mark.parametrize(
  "preset, layers, d_out",
  [
    pytest.param("qwen3_8b_r64_released", 36, (4096, 1024), marks=pytest.mark.slow),
    pytest.param("llama31_8b_r64_released", 32, (4096, 1024), marks=pytest.mark.slow),
  ],
)
def test_released_layout_counts(preset, layers, d_out):
  # One A [4096, 64] per target shared by its 8 experts, per-expert B [8, 64, d_out], and one
  # router per layer for both targets (they read the same input): (4096 + 1024) * 256 + 256
  # + 256 * 8 + 8. Qwen3-8B: q_proj + v_proj; Llama-3.1-8B (released script): q_proj + k_proj.
  d, r, n, h, d_z = 4096, 64, 8, 256, 1024
  per_layer = sum(d * r + n * r * out for out in d_out) + (d + d_z) * h + h + h * n + n
  config = presets.experiment_config("cuma", preset)
  assert config.adapter.shared_a and config.adapter.share_router
  assert param_count.count_parameters(config)["trainable"] == layers * per_layer
