"""CuMA: demographic-aware router over LoRA experts (the paper's method)."""

from cuma_jax.presets import DEFAULT_PRESET, experiment_config


def get_config(preset=DEFAULT_PRESET):
  return experiment_config("cuma", preset, ablation="none")
