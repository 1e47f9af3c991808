"""Baseline: prefix tuning / P-tuning v2 (32 virtual key/value tokens per layer)."""

from cuma_jax.presets import experiment_config


def get_config(preset="demo"):
  return experiment_config("prefix", preset, ablation="none")
