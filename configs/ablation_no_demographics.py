"""Ablation: CuMA without demographics (router sees x only; no profile in the prompt)."""

from cuma_jax.presets import experiment_config


def get_config(preset="demo"):
  return experiment_config("cuma", preset, ablation="no_demographics")
