"""Ablation: minimal CuMA (no demographics and no balance loss; top-k routing kept)."""

from cuma_jax.presets import experiment_config


def get_config(preset="demo"):
  return experiment_config("cuma", preset, ablation="minimal")
