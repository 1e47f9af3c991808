"""Baseline: plain LoRA on the same projections (no router)."""

from cuma_jax.presets import DEFAULT_PRESET, experiment_config


def get_config(preset=DEFAULT_PRESET):
  return experiment_config("lora", preset, ablation="none")
