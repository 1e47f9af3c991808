"""Trainable and total parameter counts of a config, from ``jax.eval_shape`` (no allocation).

    python -m cuma_jax.count --config=configs/cuma.py:qwen3_8b_r64

Percentages are relative to the frozen backbone's own parameter count, as in the paper.
"""

from __future__ import annotations

from absl import app
from flax import traverse_util
import flax.linen as nn
from ml_collections import config_flags
import numpy as np

from cuma_jax import platforms, schema
from cuma_jax.models.pretrained import abstract_params, build_decoder
from cuma_jax.params import is_adapter_path, is_trainable
from cuma_jax.runtime import architecture


def count_parameters(config: schema.ConfigLike) -> dict[str, float]:
  """Counts from shapes alone (``config`` is validated first)."""
  config = schema.validate(config)
  module = build_decoder(architecture(config), adapter=schema.adapter_config(config))
  shapes = traverse_util.flatten_dict(nn.unbox(abstract_params(module)))
  sizes = {path: int(np.prod(x.shape)) for path, x in shapes.items()}
  trainable = sum(n for p, n in sizes.items() if is_trainable(p, config.trainable))
  backbone = sum(n for p, n in sizes.items() if not is_adapter_path(p))
  return {
    "trainable": trainable,
    "total": sum(sizes.values()),
    "backbone": backbone,
    "trainable_percent": 100.0 * trainable / backbone,
  }


def main(argv):
  del argv
  config = schema.validate(_CONFIG.value)
  counts = count_parameters(config)
  print(
    f"method={config.method} ablation={config.ablation} "
    f"architecture={config.model.checkpoint or config.model.architecture}"
  )
  if config.method != "full":
    a = config.adapter
    print(f"adapter: router={a.router} gate={a.gate} experts={a.num_experts} top_k={a.top_k}")
  print(f"trainable parameters: {counts['trainable']:,}")
  print(f"total parameters:     {counts['total']:,} (frozen backbone {counts['backbone']:,})")
  print(f"trainable:            {counts['trainable_percent']:.2f}% of the backbone")


if __name__ == "__main__":
  # Defined here, not on import: count_parameters is imported beside cuma_jax.main, which
  # defines its own --config.
  _CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file:preset.", lock_config=True
  )
  platforms.skip_absent_tpu()
  app.run(main)
