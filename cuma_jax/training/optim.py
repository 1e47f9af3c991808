"""Optax optimiser over the trainable parameters: AdamW, schedules, clipping, accumulation."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(optim, total_steps: int) -> optax.Schedule:
  """Constant / linear decay / cosine decay to zero, each after a linear warmup."""
  peak, warmup = optim.learning_rate, optim.warmup_steps
  decay_steps = max((optim.horizon_steps or total_steps) - warmup, 1)
  if optim.schedule == "constant":
    main = optax.constant_schedule(peak)
  elif optim.schedule == "linear":
    main = optax.linear_schedule(peak, 0.0, decay_steps)
  elif optim.schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, decay_steps)
  else:
    raise ValueError(f"optim.schedule={optim.schedule!r}; allowed: constant, linear, cosine")
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def _decayed(params):
  """Weight decay on matrices only: biases and norm scales are left alone (HF Trainer)."""
  return jax.tree.map(lambda x: x.ndim > 1, params)


def make_optimizer(optim, total_steps: int) -> optax.GradientTransformation:
  """``total_steps`` counts optimiser updates (after gradient accumulation)."""
  chain = []
  if optim.grad_clip:
    chain.append(optax.clip_by_global_norm(optim.grad_clip))
  chain.append(
    optax.adamw(
      learning_rate_schedule(optim, total_steps),
      b1=optim.b1,
      b2=optim.b2,
      weight_decay=optim.weight_decay,
      mask=_decayed,
    )
  )
  tx = optax.chain(*chain)
  if optim.accumulation_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=optim.accumulation_steps)
  return tx
