"""Baseline: prefix tuning / P-tuning v2 (32 virtual key/value tokens per layer)."""

from cuma_jax.presets import DEFAULT_PRESET, experiment_config


def get_config(preset=DEFAULT_PRESET):
  return experiment_config("prefix", preset, ablation="none")
