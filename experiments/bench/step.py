"""One full SFT step (forward, backward, AdamW on the adapters) of a small Qwen3 with CuMA.

    python experiments/bench/step.py [--repeats N] [--json] [--mesh]

The job's own jitted step (``cuma_jax.training.loop.ShardedStep``) at a small Qwen3 shape:
hidden 1024, 4 layers, 16 heads / 8 kv heads of 64, MLP 3072, vocabulary 8192, batch 4 x 256
tokens, CuMA on q_proj and v_proj (8 experts, top-2, rank 64, router hidden 32, dense
dispatch), float32, no remat. Reports the step's median time, tokens/s, its model FLOPs
(``cuma_jax.plan.model_flops``, counted from the shapes: every matmul's forward, the
activation gradients of every matmul, the weight gradients of the trainable ones only) and
the fraction of this machine's float32 matmul rate, measured in the same run on a
2048 x 2048 ``jnp`` matmul.

Where the time goes: the forward pass alone, the step with plain LoRA r=64 in place of
CuMA (no routers, one expert instead of eight), and the step recomputing each layer's
forward in the backward pass (``model.remat=full``, the 8B presets' setting), each timed as
a row of its own.

``--mesh`` runs the step on 8 host devices under each rules preset instead, at batch 8 x 256
(the 8 devices share this machine's cores, so this shows the presets' overhead, not a
speed-up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if "--mesh" in sys.argv:
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  )

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402

from cuma_jax import plan, presets, schema, sharding  # noqa: E402
from cuma_jax.models.config import ModelConfig  # noqa: E402
from cuma_jax.models.pretrained import build_decoder, dummy_inputs  # noqa: E402
from cuma_jax.params import merge_params, partition  # noqa: E402
from cuma_jax.training import optim  # noqa: E402
from cuma_jax.training.loop import ShardedStep  # noqa: E402
from cuma_jax.training.step import demographics_for, forward  # noqa: E402

SHAPE = dict(
  hidden_size=1024,
  num_hidden_layers=4,
  num_attention_heads=16,
  num_key_value_heads=8,
  head_dim=64,
  intermediate_size=3072,
  vocab_size=8192,
)
BATCH, LENGTH = 4, 256
MESH_BATCH = 8  # --mesh: a batch every preset's 8-device mesh divides
EXPERTS, TOP_K, RANK, DEMO = 8, 2, 64, 64
MODEL_CONFIG = ModelConfig.from_hf(transformers.Qwen3Config(**SHAPE))
TARGETS = ("q_proj", "v_proj")


def step_config(
  method: str = "cuma", preset: str = "dp", shape=(("data", 1),), remat="none", batch=BATCH
):
  config = presets.experiment_config(method, "tiny")
  with config.unlocked():
    presets.apply_overrides(
      config,
      {
        "adapter.targets": TARGETS,
        "adapter.num_experts": 1 if method == "lora" else EXPERTS,
        "adapter.top_k": 1 if method == "lora" else TOP_K,
        "adapter.rank": RANK,
        "adapter.alpha": 2.0 * RANK,
        "adapter.strategy": "dense",
        "adapter.demographic_dim": DEMO,
        "data.batch_size": batch,
        "data.max_length": LENGTH,
        "mesh.rules_preset": preset,
        "mesh.shape": shape,
        "model.remat": remat,
      },
    )
  return config


def matmul_rate(repeats: int = 10, n: int = 2048) -> float:
  """This machine's float32 matmul rate (FLOP/s), median of ``repeats``."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2.0 * n**3 / statistics.median(times)


def build(config, forward_only: bool = False):
  """(one step callable, its arguments) on the config's mesh."""
  module = build_decoder(
    MODEL_CONFIG, remat=config.model.remat, adapter=schema.adapter_config(config)
  )
  layout = sharding.Layout.of(config.mesh)
  params = nn.unbox(module.init(jax.random.key(0), **dummy_inputs(module))["params"])
  # B starts at zero: random values, so every expert's path carries numbers.
  params = jax.tree_util.tree_map_with_path(
    lambda p, v: v + 0.01 if getattr(p[-1], "key", "") == "b" else v, params
  )
  trainable, frozen = partition(params, config.trainable)
  tx = optim.make_optimizer(config.optim, 100)
  sharded = ShardedStep.of(config, module, layout, tx, trainable)
  rng = np.random.default_rng(0)
  batch_size = config.data.batch_size
  ids = rng.integers(0, SHAPE["vocab_size"], (batch_size, LENGTH)).astype(np.int32)
  loss_mask = np.zeros((batch_size, LENGTH), np.int32)
  loss_mask[:, -3:-1] = 1  # the answer letter and end-of-turn
  batch = {
    "input_ids": ids,
    "attention_mask": np.ones((batch_size, LENGTH), np.int32),
    "targets": np.roll(ids, -1, axis=1),
    "loss_mask": loss_mask,
    "profile_index": np.arange(batch_size, dtype=np.int32),
  }
  batch = {k: jax.device_put(v, layout.batch) for k, v in batch.items()}
  table = jax.device_put(
    jnp.asarray(rng.normal(size=(batch_size, DEMO)), jnp.float32), layout.replicated
  )
  trainable = jax.device_put(trainable, sharded.trainable)
  frozen = jax.device_put(frozen, sharded.frozen)
  opt_state = jax.jit(tx.init, out_shardings=sharded.opt_state)(trainable)
  key = jax.random.PRNGKey(0)
  if forward_only:
    positions = jnp.asarray(np.tile([LENGTH - 3, LENGTH - 2], (batch_size, 1)), jnp.int32)

    @jax.jit
    def fwd(trainable, frozen, table, batch):
      z = demographics_for(table, batch) if config.method == "cuma" else None
      logits, _ = forward(
        module, merge_params(trainable, frozen), batch, z, logit_indices=positions
      )
      return logits.sum()

    return lambda: fwd(trainable, frozen, table, batch), layout
  state = {"trainable": trainable, "opt_state": opt_state}

  def run():
    with layout.active():
      state["trainable"], state["opt_state"], metrics = sharded.step(
        state["trainable"], frozen, state["opt_state"], table, batch, key
      )
    return metrics["loss"]

  return run, layout


def time_step(run, repeats: int) -> float:
  jax.block_until_ready(run())  # compile
  jax.block_until_ready(run())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--mesh", action="store_true", help="each rules preset on 8 host devices")
  args = parser.parse_args()
  rate = matmul_rate()
  rows = {}
  if args.mesh:
    cases = {
      "one device": step_config(batch=MESH_BATCH),
      "dp (data 8)": step_config(preset="dp", shape=(("data", 8),), batch=MESH_BATCH),
      "fsdp (fsdp 8)": step_config(preset="fsdp", shape=(("fsdp", 8),), batch=MESH_BATCH),
      "tp (data 2 x model 4)": step_config(
        preset="tp", shape=(("data", 2), ("model", 4)), batch=MESH_BATCH
      ),
      "fsdp_tp (fsdp 2 x model 4)": step_config(
        preset="fsdp_tp", shape=(("fsdp", 2), ("model", 4)), batch=MESH_BATCH
      ),
    }
    variants = {name: (c, False) for name, c in cases.items()}
  else:
    variants = {
      "CuMA step (forward, backward, AdamW)": (step_config("cuma"), False),
      "CuMA forward only": (step_config("cuma"), True),
      "LoRA r=64 step (no routers, one expert)": (step_config("lora"), False),
      "CuMA step, each layer rematerialised (remat=full)": (
        step_config("cuma", remat="full"),
        False,
      ),
    }
  for name, (config, forward_only) in variants.items():
    run, _ = build(config, forward_only)
    seconds = time_step(run, args.repeats)
    tokens = config.data.batch_size * LENGTH
    rows[name] = {"seconds": seconds, "tokens_per_second": tokens / seconds}
  first_config = next(iter(variants.values()))[0]
  flops = plan.model_flops(first_config, MODEL_CONFIG)["train step"]
  main_row = next(iter(rows.values()))
  result = {
    "matmul_gflops": rate / 1e9,
    "model_gflop_per_step": flops / 1e9,
    "step_gflops": flops / main_row["seconds"] / 1e9,
    "fraction_of_matmul_rate": flops / main_row["seconds"] / rate,
    "rows": rows,
  }
  if args.json:
    print(json.dumps(result, indent=2))
    return
  print(f"2048x2048 fp32 matmul: {rate / 1e9:.1f} GFLOP/s (median of 10)")
  print(
    f"model FLOPs per CuMA step (batch {first_config.data.batch_size} x {LENGTH}): "
    f"{flops / 1e9:.2f} GFLOP"
  )
  print("| case | step (ms) | tokens/s |")
  print("|---|---|---|")
  for name, row in rows.items():
    print(f"| {name} | {row['seconds'] * 1e3:.1f} | {row['tokens_per_second']:.0f} |")
  print(
    f"{next(iter(rows))}: {result['step_gflops']:.1f} GFLOP/s = "
    f"{100 * result['fraction_of_matmul_rate']:.0f}% of the matmul rate"
  )


if __name__ == "__main__":
  main()
