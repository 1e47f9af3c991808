"""Ablation: CuMA without demographics (router sees x only; no profile in the prompt)."""

from cuma_jax.presets import DEFAULT_PRESET, experiment_config


def get_config(preset=DEFAULT_PRESET):
  return experiment_config("cuma", preset, ablation="no_demographics")
