"""Baseline: HydraLoRA (shared A, per-expert B, router on the token only)."""

from cuma_jax.presets import experiment_config


def get_config(preset="demo"):
  return experiment_config("hydralora", preset, ablation="none")
