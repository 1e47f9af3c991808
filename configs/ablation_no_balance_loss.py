"""Ablation: CuMA without the load-balancing loss (lambda_aux = 0)."""

from cuma_jax.presets import DEFAULT_PRESET, experiment_config


def get_config(preset=DEFAULT_PRESET):
  return experiment_config("cuma", preset, ablation="no_balance_loss")
