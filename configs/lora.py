"""Baseline: plain LoRA on the same projections (no router)."""

from cuma_jax.presets import experiment_config


def get_config(preset="demo"):
  return experiment_config("lora", preset, ablation="none")
