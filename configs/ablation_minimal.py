"""Ablation: minimal CuMA (soft routing, no demographics, no balance loss together)."""

from cuma_jax.presets import DEFAULT_PRESET, experiment_config


def get_config(preset=DEFAULT_PRESET):
  return experiment_config("cuma", preset, ablation="minimal")
