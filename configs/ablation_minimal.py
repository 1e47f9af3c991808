"""Ablation: minimal CuMA (soft routing, no demographics, no balance loss together)."""

from cuma_jax.presets import experiment_config


def get_config(preset="demo"):
  return experiment_config("cuma", preset, ablation="minimal")
