"""Baseline: MixLoRA (per-expert A and B, one linear token router shared by q and v)."""

from cuma_jax.presets import DEFAULT_PRESET, experiment_config


def get_config(preset=DEFAULT_PRESET):
  return experiment_config("mixlora", preset, ablation="none")
