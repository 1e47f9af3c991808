"""One full SFT step (forward, backward, AdamW on the adapters) of a small Qwen3 with CuMA.

    python experiments/bench/step.py [--repeats N] [--json] [--mesh] [--layout released]

The job's own jitted step (``cuma_jax.training.loop.ShardedStep``) at a small Qwen3 shape:
hidden 1024, 4 layers, 16 heads / 8 kv heads of 64, MLP 3072, vocabulary 8192, batch 4 x 256
tokens, CuMA on q_proj and v_proj (8 experts, top-2, rank 64, dense dispatch), float32, no
remat. ``--layout`` picks the adapter layout: ``bench`` (the default: per-expert A, a router
per target with hidden 32, demographic width 64) or ``released`` (the released training
scripts': one A shared by a projection's experts, one router per layer shared by q and v,
router hidden 256, demographic width 1024). Reports the step's median time, tokens/s, its
model FLOPs (``cuma_jax.plan.model_flops``, counted from the shapes: every matmul's
forward, the activation gradients of every matmul, the weight gradients of the trainable
ones only) and the fraction of this machine's float32 matmul rate, measured in the same
run on a 2048 x 2048 ``jnp`` matmul timed in every round: the median over rounds of each
round's ratio, by wall-clock time and by this process's CPU time (the work done, whatever
other jobs hold the cores). experiments/bench/step_profile.py says where the time goes.

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
import functools
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

from cuma_jax import plan, platforms, presets, schema, sharding  # noqa: E402
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
EXPERTS, TOP_K, RANK = 8, 2, 64
# --layout: the adapter's layout, and the demographic width its routers read.
LAYOUTS = {
  "bench": {
    "adapter.shared_a": False,
    "adapter.share_router": False,
    "adapter.router_hidden": (32,),
    "adapter.demographic_dim": 64,
  },
  "released": {
    **presets.RELEASED_LAYOUT,
    "adapter.router_hidden": (256,),
    "adapter.demographic_dim": 1024,
  },
}
MODEL_CONFIG = ModelConfig.from_hf(transformers.Qwen3Config(**SHAPE))
TARGETS = ("q_proj", "v_proj")
MATMUL = "2048 x 2048 float32 matmul"


def step_config(
  method: str = "cuma",
  preset: str = "dp",
  shape=(("data", 1),),
  remat="none",
  batch=BATCH,
  layout: str = "bench",
  overrides: dict | None = None,
):
  """The config of one benchmarked step; ``overrides`` (dotted keys) are set last."""
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
        **LAYOUTS[layout],
        "data.batch_size": batch,
        "data.max_length": LENGTH,
        "mesh.rules_preset": preset,
        "mesh.shape": shape,
        "model.remat": remat,
        **(overrides or {}),
      },
    )
  return schema.validate(config)


def matmul(n: int = 2048):
  """A callable running one 2048 x 2048 float32 ``jnp`` matmul, and its FLOPs."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  product = jax.jit(lambda a: a @ a)
  return lambda: product(a), 2.0 * n**3


def matmul_rate(repeats: int = 10) -> float:
  """This machine's float32 matmul rate (FLOP/s), median of ``repeats``: the number each
  results page states beside its timings."""
  product, flops = matmul()
  jax.block_until_ready(product())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(product())
    times.append(time.perf_counter() - start)
  return flops / statistics.median(times)


def build(config, forward_only: bool = False, model_config: ModelConfig = MODEL_CONFIG):
  """(one step callable, its layout) on the config's mesh, with random weights of
  ``model_config``'s shapes in the config's dtypes."""
  module = build_decoder(
    model_config,
    dtype=jnp.dtype(config.model.dtype),
    param_dtype=jnp.dtype(config.model.param_dtype),
    scan_layers=config.model.scan_layers,
    remat=config.model.remat,
    adapter=schema.adapter_config(config),
  )
  layout = sharding.Layout.of(config.mesh)
  params = jax.jit(lambda key: module.init(key, **dummy_inputs(module))["params"])(
    jax.random.key(0)
  )
  # B starts at zero: random values, so every expert's path carries numbers.
  params = jax.tree_util.tree_map_with_path(
    lambda p, v: v + 0.01 if getattr(p[-1], "key", "") == "b" else v, nn.unbox(params)
  )
  trainable, frozen = partition(params, config.trainable)
  tx = optim.make_optimizer(config.optim, 100)
  sharded = ShardedStep.of(config, module, layout, tx, trainable)
  rng = np.random.default_rng(0)
  batch_size, length = config.data.batch_size, config.data.max_length
  ids = rng.integers(0, model_config.vocab_size, (batch_size, length)).astype(np.int32)
  loss_mask = np.zeros((batch_size, length), np.int32)
  loss_mask[:, -3:-1] = 1  # the answer letter and end-of-turn
  batch = {
    "input_ids": ids,
    "attention_mask": np.ones((batch_size, length), np.int32),
    "targets": np.roll(ids, -1, axis=1),
    "loss_mask": loss_mask,
    "profile_index": np.arange(batch_size, dtype=np.int32),
  }
  batch = {k: jax.device_put(v, layout.batch) for k, v in batch.items()}
  demo = config.adapter.demographic_dim
  table = jax.device_put(
    jnp.asarray(rng.normal(size=(batch_size, demo)), jnp.float32), layout.replicated
  )
  trainable = jax.device_put(trainable, sharded.trainable)
  frozen = jax.device_put(frozen, sharded.frozen)
  opt_state = jax.jit(tx.init, out_shardings=sharded.opt_state)(trainable)
  key = jax.random.PRNGKey(0)
  if forward_only:
    positions = jnp.asarray(np.tile([length - 3, length - 2], (batch_size, 1)), jnp.int32)

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


def time_rounds(runs: dict, repeats: int) -> tuple[dict, dict]:
  """({name: wall seconds of each round}, {name: this process's CPU seconds of each round})
  of each callable, timed in rounds that run each once in turn (so a load change on a
  shared machine hits every case alike), after two warm-up calls (the first compiles).
  CPU time counts the work done, not the waits for a core that other jobs hold."""
  for run in runs.values():
    jax.block_until_ready(run())
    jax.block_until_ready(run())
  wall, cpu = {name: [] for name in runs}, {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(run())
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  return wall, cpu


def medians(times: dict[str, list[float]]) -> dict[str, float]:
  return {name: statistics.median(t) for name, t in times.items()}


def main():
  platforms.skip_absent_tpu()  # no libtpu start-up errors on a CPU machine
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--mesh", action="store_true", help="each rules preset on 8 host devices")
  parser.add_argument("--layout", choices=tuple(LAYOUTS), default="bench", help="adapter layout")
  args = parser.parse_args()
  config_of = functools.partial(step_config, layout=args.layout)
  rows = {}
  if args.mesh:
    cases = {
      "one device": config_of(batch=MESH_BATCH),
      "dp (data 8)": config_of(preset="dp", shape=(("data", 8),), batch=MESH_BATCH),
      "fsdp (fsdp 8)": config_of(preset="fsdp", shape=(("fsdp", 8),), batch=MESH_BATCH),
      "tp (data 2 x model 4)": config_of(
        preset="tp", shape=(("data", 2), ("model", 4)), batch=MESH_BATCH
      ),
      "fsdp_tp (fsdp 2 x model 4)": config_of(
        preset="fsdp_tp", shape=(("fsdp", 2), ("model", 4)), batch=MESH_BATCH
      ),
    }
    variants = {name: (c, False) for name, c in cases.items()}
  else:
    variants = {
      "CuMA step (forward, backward, AdamW)": (config_of("cuma"), False),
      "CuMA forward only": (config_of("cuma"), True),
      "LoRA r=64 step (no routers, one expert)": (config_of("lora"), False),
      "CuMA step, each layer rematerialised (remat=full)": (
        config_of("cuma", remat="full"),
        False,
      ),
    }
  product, product_flops = matmul()
  runs = {MATMUL: product}
  runs.update(
    {name: build(config, forward_only)[0] for name, (config, forward_only) in variants.items()}
  )
  times, cpu_times = time_rounds(runs, args.repeats)
  seconds = medians(times)
  rate = product_flops / seconds[MATMUL]
  for name, (config, _) in variants.items():
    tokens = config.data.batch_size * LENGTH
    rows[name] = {"seconds": seconds[name], "tokens_per_second": tokens / seconds[name]}
  first_config = next(iter(variants.values()))[0]
  flops = plan.model_flops(first_config, MODEL_CONFIG)["train step"]
  main_row = next(iter(rows.values()))
  # Each round's step against the matmul of the same round: the machine's load changes.
  fractions, cpu_fractions = (
    [
      flops / step * matmul_seconds / product_flops
      for step, matmul_seconds in zip(t[next(iter(rows))], t[MATMUL], strict=True)
    ]
    for t in (times, cpu_times)
  )
  result = {
    "matmul_gflops": rate / 1e9,
    "model_gflop_per_step": flops / 1e9,
    "step_gflops": flops / main_row["seconds"] / 1e9,
    "fraction_of_matmul_rate": statistics.median(fractions),
    "fraction_per_round": fractions,
    "fraction_of_matmul_rate_by_cpu_time": statistics.median(cpu_fractions),
    "fraction_by_cpu_time_per_round": cpu_fractions,
    "rows": rows,
  }
  if args.json:
    print(json.dumps(result, indent=2))
    return
  print(f"2048x2048 fp32 matmul: {rate / 1e9:.1f} GFLOP/s (median of {args.repeats})")
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
    f"{100 * result['fraction_of_matmul_rate']:.0f}% of the matmul rate (median over rounds "
    f"of the ratio to the same round's matmul; rounds: "
    f"{', '.join(f'{100 * f:.0f}%' for f in fractions)})"
  )
  print(
    f"by CPU time (work done, whatever the load): "
    f"{100 * result['fraction_of_matmul_rate_by_cpu_time']:.0f}% of the matmul's rate (rounds: "
    f"{', '.join(f'{100 * f:.0f}%' for f in cpu_fractions)})"
  )


if __name__ == "__main__":
  main()
