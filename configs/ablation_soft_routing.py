"""Ablation: CuMA with soft routing (top-k experts weighted by raw probabilities)."""

from cuma_jax.presets import DEFAULT_PRESET, experiment_config


def get_config(preset=DEFAULT_PRESET):
  return experiment_config("cuma", preset, ablation="soft_routing")
