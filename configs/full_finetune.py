"""Baseline: full fine-tuning (no adapters, the whole backbone trainable)."""

from cuma_jax.presets import DEFAULT_PRESET, experiment_config


def get_config(preset=DEFAULT_PRESET):
  return experiment_config("full", preset, ablation="none")
