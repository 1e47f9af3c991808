"""Will a config fit? The training and evaluation steps compiled ahead of time, from shapes.

``python -m cuma_jax.plan --config=configs/cuma.py:qwen3_8b_r64 --target=v5e-8``

lowers and compiles the job's own training step (forward, backward, optimiser update) and
evaluation step for the target's devices without allocating a weight, and prints per
device: arguments, outputs, temporaries and their total against the target's memory, the
step's FLOPs and the collectives in the compiled program.  Targets are host devices
(``cpu:N``, with ``--memory_gib`` as the budget, e.g. 80 for an 8 x H100 node, for which
no GPU topology can be compiled without GPUs) or TPU topologies compiled for through
``libtpu`` without the hardware (``pip install libtpu``).  ``--suggest`` plans every rules
preset and remat policy and lists the ones that fit.
"""

from __future__ import annotations

import dataclasses
import os
import re

from absl import app, flags
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from cuma_jax import runtime, schema, sharding, tasks
from cuma_jax.data import prompts
from cuma_jax.evaluation.survey import sharded_choice
from cuma_jax.models.pretrained import abstract_params, build_decoder
from cuma_jax.params import is_trainable, partition
from cuma_jax.training import optim
from cuma_jax.training.loop import ShardedStep
from cuma_jax.training.step import SFT_BATCH_KEYS

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
  """Devices to compile for and the memory each has."""

  topology: str  # a jax.experimental.topologies name ("v5e:2x4"), or "" for host devices
  memory_gib: float
  note: str = ""


# Names as Cloud TPU sells them (the number counts TensorCores: v5p-8 and v4-8 are 4 chips).
TPU_TARGETS = {
  "v4-8": Target("v4:2x2x1", 32.0),
  "v5e-4": Target("v5e:2x2", 16.0),
  "v5e-8": Target("v5e:2x4", 16.0),
  "v5p-8": Target("v5p:2x2x1", 95.0),
  "v6e-4": Target("v6e:2x2", 32.0),
  "v6e-8": Target("v6e:2x4", 32.0),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_CPU_TARGET = re.compile(r"^cpu:(\d+)$")


def _define_flags() -> None:
  """The command line's flags (defined when run as a program, so the module imports
  beside other absl programs)."""
  config_flags.DEFINE_config_file(
    "config", None, "Experiment config file:preset.", lock_config=True
  )
  flags.DEFINE_string(
    "target", "cpu:1", f"cpu:N (host devices) or a TPU slice: {', '.join(TPU_TARGETS)}."
  )
  flags.DEFINE_float("memory_gib", 80.0, "Per-device memory of a cpu:N target (80: an H100's HBM).")
  flags.DEFINE_bool(
    "suggest", False, "Plan every rules preset and remat policy; list those that fit."
  )


def target_devices(name: str, memory_gib: float = 80.0):
  """(devices, Target) for a target name (see the module docstring)."""
  match = _CPU_TARGET.match(name)
  if match:
    count, devices = int(match.group(1)), jax.devices("cpu")
    if len(devices) < count:
      raise ValueError(
        f"--target={name}: {len(devices)} host devices; start the process with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={count}"
      )
    note = "XLA:CPU's sizes (it may keep float32 copies of bf16 weights)"
    return devices[:count], Target("", memory_gib, note)
  if name not in TPU_TARGETS:
    raise ValueError(f"--target={name!r}: use cpu:N or one of {sorted(TPU_TARGETS)}")
  from jax.experimental import topologies

  target = TPU_TARGETS[name]
  try:
    topology = topologies.get_topology_desc(topology_name=target.topology, platform="tpu")
  except Exception as error:  # libtpu missing or too old for this generation
    raise RuntimeError(
      f"--target={name} compiles through libtpu, which could not describe "
      f"{target.topology}: {error}. Install it with `pip install libtpu`."
    ) from error
  return topology.devices, target


@dataclasses.dataclass(frozen=True)
class Program:
  """One compiled program's per-device memory (bytes), FLOPs and collectives."""

  name: str
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  collectives: dict[str, int]
  # The compiler's refusal (the program does not fit the target's memory), if it refused.
  refusal: str = ""

  @property
  def total(self) -> int:
    """Live at the peak: arguments, outputs not written in place of a donated argument,
    and temporaries."""
    return self.arguments + self.outputs - self.aliased + self.temporaries


def _program(name: str, lowered) -> Program:
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as error:
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    refusal = str(error).strip().splitlines()[0]
    return Program(name, 0, 0, 0, 0, {}, refusal=refusal.split(": ", 1)[-1])
  memory = compiled.memory_analysis()
  text = compiled.as_text()
  return Program(
    name=name,
    arguments=int(memory.argument_size_in_bytes),
    outputs=int(memory.output_size_in_bytes),
    aliased=int(memory.alias_size_in_bytes),
    temporaries=int(memory.temp_size_in_bytes),
    collectives={
      op: len(re.findall(rf"\s{op}(?:-start)?\(", text))
      for op in COLLECTIVES
      if re.search(rf"\s{op}(?:-start)?\(", text)
    },
  )


def model_flops(config: schema.ConfigLike, model_config=None) -> dict[str, float]:
  """FLOPs of one training step and one evaluation batch (all devices), from the shapes: 2
  per multiply-add of every matmul and of attention's scores and values; the backward pass
  adds each matmul's activation gradient, and its weight gradient where it is trained
  (recomputation under remat is not counted). XLA's own count sees a scanned layer stack's
  loop body once, so it is not used. ``model_config`` defaults to the config's backbone."""
  config = schema.validate(config)
  model_config = model_config or runtime.architecture(config)
  module = build_decoder(model_config, adapter=schema.adapter_config(config))
  cfg = module.config
  macs = {"frozen": 0, "trained": 0}
  for path, leaf in traverse_util.flatten_dict(nn.unbox(abstract_params(module))).items():
    if leaf.ndim >= 2 and path[0].startswith("layers"):  # per-token matmul weights
      trained = is_trainable(path, config.trainable)
      macs["trained" if trained else "frozen"] += int(np.prod(leaf.shape))
  attention = 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim  # per token and key
  train_tokens = config.data.batch_size * jax.process_count() * config.data.max_length
  eval_tokens = config.eval.batch_size * config.data.max_length
  keys = config.data.max_length
  forward = macs["frozen"] + macs["trained"] + attention * keys
  backward = macs["frozen"] + 2 * macs["trained"] + 2 * attention * keys
  return {
    "train step": 2.0 * train_tokens * (forward + backward),
    "eval step": 2.0 * eval_tokens * forward,
  }


def _abstract(tree, shardings, dtype=None):
  return jax.tree.map(
    lambda x, sh: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=sh), tree, shardings
  )


def plan(config: schema.ConfigLike, devices) -> list[Program]:
  """The training step and the evaluation step of ``config`` compiled for ``devices``."""
  return compile_programs(lower(config, devices))


def compile_programs(lowered: dict) -> list[Program]:
  """Compiles each lowering of :func:`lower` and reads its memory and collectives."""
  return [_program(name, lowering) for name, lowering in lowered.items()]


def lower(config: schema.ConfigLike, devices) -> dict:
  """{program name: its lowering} of ``config``'s training and evaluation steps."""
  config = schema.validate(config)
  layout = runtime.check_layout(
    config,
    runtime.architecture(config),
    devices,
    batches=tasks.get(config.task).batch_rows(config),
  )
  module = build_decoder(
    runtime.architecture(config),
    dtype=jnp.dtype(config.model.dtype),
    param_dtype=jnp.dtype(config.model.param_dtype),
    scan_layers=config.model.scan_layers,
    remat=config.model.remat,
    adapter=schema.adapter_config(config),
  )
  shapes = nn.unbox(abstract_params(module))
  trainable, frozen = partition(shapes, config.trainable)
  tx = optim.make_optimizer(config.optim, 1000)
  sharded = ShardedStep.of(config, module, layout, tx, trainable)
  batch_size = config.data.batch_size * jax.process_count()
  length = config.data.max_length
  batch = {
    k: jax.ShapeDtypeStruct(
      (batch_size,) if k == "profile_index" else (batch_size, length),
      jnp.int32,
      sharding=layout.batch,
    )
    for k in SFT_BATCH_KEYS
  }
  adapter = schema.adapter_config(config)
  table = None
  if adapter is not None and adapter.uses_demographics:
    # One row per example of the batch: the real table (one row per profile) is replicated
    # and small beside the model.
    table = jax.ShapeDtypeStruct(
      (batch_size, adapter.demographic_dim), jnp.float32, sharding=layout.replicated
    )
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=layout.replicated)
  opt_state = _abstract(jax.eval_shape(tx.init, trainable), sharded.opt_state)
  with layout.active():
    train = sharded.step.lower(
      _abstract(trainable, sharded.trainable),
      _abstract(frozen, sharded.frozen, jnp.dtype(config.model.param_dtype)),
      opt_state,
      table,
      batch,
      rng,
    )
  choose, param_sh = sharded_choice(module, layout, tuple(range(len(prompts.LETTERS))))
  eval_size = config.eval.batch_size
  eval_batch = {
    k: jax.ShapeDtypeStruct(
      (eval_size, length) if k in ("input_ids", "attention_mask") else (eval_size,),
      jnp.int32,
      sharding=layout.batch,
    )
    for k in ("input_ids", "attention_mask", "prompt_length", "profile_index", "option_count")
  }
  eval_table = None
  if table is not None:
    eval_table = jax.ShapeDtypeStruct(
      (eval_size, table.shape[1]), jnp.float32, sharding=layout.replicated
    )
  with layout.active():
    evaluate = choose.lower(
      _abstract(shapes, param_sh, jnp.dtype(config.model.param_dtype)), eval_table, eval_batch
    )
  return {"train step": train, "eval step": evaluate}


def _size(num_bytes: float) -> str:
  return f"{num_bytes / GIB:.2f} GiB" if num_bytes >= GIB / 10 else f"{num_bytes / 2**20:.2f} MiB"


def report(
  config: schema.Config, target_name: str, target: Target, devices, programs, out=print
) -> bool:
  """Prints the plan's table; returns whether every program fits."""
  sizes = sharding.mesh_sizes(sharding.mesh_shape(config.mesh), len(devices))
  mesh = " x ".join(f"{axis} {n}" for axis, n in sizes.items() if n > 1) or "one device"
  out(
    f"target {target_name} ({len(devices)} devices, {target.memory_gib:g} GiB each"
    + (f"; {target.note}" if target.note else "")
    + f"), rules_preset={config.mesh.rules_preset}, mesh {mesh}, "
    f"remat={config.model.remat}, batch {config.data.batch_size} x {config.data.max_length}"
  )
  out("| program | arguments | outputs | temporaries | total | fits | model TFLOP | collectives |")
  out("|---|---|---|---|---|---|---|---|")
  fits = True
  flops = model_flops(config)
  for p in programs:
    if p.refusal:
      fits = False
      out(f"| {p.name} | | | | | NO | | the compiler: {p.refusal} |")
      continue
    ok = p.total <= target.memory_gib * GIB
    fits &= ok
    collectives = ", ".join(f"{op} {n}" for op, n in p.collectives.items()) or "none"
    out(
      f"| {p.name} | {_size(p.arguments)} | {_size(p.outputs - p.aliased)} | "
      f"{_size(p.temporaries)} | {_size(p.total)} | {'yes' if ok else 'NO'} | "
      f"{flops[p.name] / 1e12:.1f} | {collectives} |"
    )
  return fits


def main(argv):
  del argv
  args = flags.FLAGS
  # JAX runs on the host: TPU targets are compiled for through libtpu, not attached.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  match = _CPU_TARGET.match(args.target)
  if match:  # Host devices are set before JAX starts its CPU backend (first use, below).
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={match.group(1)}"
    )
  config = schema.validate(args.config)
  devices, target = target_devices(args.target, args.memory_gib)
  if not args.suggest:
    report(config, args.target, target, devices, plan(config, devices))
    return
  fitting = []
  for preset in sharding.RULES_PRESETS:
    for remat in ("none", "dots", "full"):
      variant = dataclasses.replace(
        config,
        mesh=dataclasses.replace(config.mesh, rules_preset=preset, shape=()),
        model=dataclasses.replace(config.model, remat=remat),
      )
      try:
        programs = plan(variant, devices)
      except ValueError as error:  # a mesh that does not divide the model
        print(f"rules_preset={preset} remat={remat}: {error}")
        continue
      if report(variant, args.target, target, devices, programs):
        fitting.append((max(p.total for p in programs), preset, remat))
  if not fitting:
    print("no rules preset and remat policy fits: more devices, or a smaller batch")
  for peak, preset, remat in sorted(fitting):
    print(
      f"fits: --config.mesh.rules_preset={preset} --config.model.remat={remat} "
      f"({peak / GIB:.2f} GiB)"
    )


if __name__ == "__main__":
  _define_flags()
  app.run(main)
