"""CuMA: demographic-aware router over LoRA experts (the paper's method)."""

from cuma_jax.presets import experiment_config


def get_config(preset="demo"):
  return experiment_config("cuma", preset, ablation="none")
