"""Baseline: MixLoRA (per-expert A and B, one linear token router shared by q and v)."""

from cuma_jax.presets import experiment_config


def get_config(preset="demo"):
  return experiment_config("mixlora", preset, ablation="none")
