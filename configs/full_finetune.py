"""Baseline: full fine-tuning (no adapters, the whole backbone trainable)."""

from cuma_jax.presets import experiment_config


def get_config(preset="demo"):
  return experiment_config("full", preset, ablation="none")
