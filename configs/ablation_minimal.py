"""Ablation: minimal CuMA (no demographics and no balance loss; top-k routing kept)."""

from cuma_jax.presets import DEFAULT_PRESET, experiment_config


def get_config(preset=DEFAULT_PRESET):
  return experiment_config("cuma", preset, ablation="minimal")
