"""Ablation: CuMA without the load-balancing loss (lambda_aux = 0)."""

from cuma_jax.presets import experiment_config


def get_config(preset="demo"):
  return experiment_config("cuma", preset, ablation="no_balance_loss")
