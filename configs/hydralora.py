"""Baseline: HydraLoRA (shared A, per-expert B, router on the token only)."""

from cuma_jax.presets import DEFAULT_PRESET, experiment_config


def get_config(preset=DEFAULT_PRESET):
  return experiment_config("hydralora", preset, ablation="none")
