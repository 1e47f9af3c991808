"""The ahead-of-time plan: per-device memory of the compiled steps, from shapes alone."""

import collections
import re

from helpers import tiny_config
import jax
import numpy as np
import pytest
import transformers

from cuma_jax import plan
from cuma_jax.models.config import ModelConfig

pytestmark = pytest.mark.slow


def _nbytes(tree) -> int:
  return sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in tree)


# Where each program's batch is among its arguments: (trainable, frozen, opt_state, table,
# batch, rng) and (params, table, batch).
BATCH_ARGUMENT = {"train step": 4, "eval step": 2}


def _replicated_share(lowered, batch_index: int, devices: int) -> int:
  """One device's arguments when everything but the batch is replicated: all of every
  argument, and 1/devices of the batch (computed from the arguments' shapes, apart from
  XLA's memory analysis)."""
  # The train step's last argument, the dropout key, is unused without dropout (the tiny
  # preset has none) and XLA drops it.
  args = lowered.args_info[0][: batch_index + 1]
  batch = jax.tree.leaves(args[batch_index])
  return _nbytes(jax.tree.leaves(args)) - _nbytes(batch) + _nbytes(batch) // devices


def test_plan_reports_each_devices_share_and_fsdp_shards_the_weights():
  devices = jax.devices()[:8]
  arguments = {}
  for preset in ("dp", "fsdp"):
    config = tiny_config(**{"mesh.rules_preset": preset})
    lowered = plan.lower(config, devices)
    programs = plan.compile_programs(lowered)
    assert [p.name for p in programs] == ["train step", "eval step"]
    for program in programs:
      assert program.total >= program.arguments > 0
      if preset == "dp":
        assert program.arguments == _replicated_share(
          lowered[program.name], BATCH_ARGUMENT[program.name], 8
        ), program.name
    arguments[preset] = programs[0].arguments
    lines = []
    assert plan.report(config, "cpu:8", plan.Target("", 80.0), devices, programs, lines.append)
    assert lines[0].startswith(f"target cpu:8 (8 devices, 80 GiB each), rules_preset={preset}")
    assert lines[3].startswith("| train step |") and "| yes |" in lines[3]
    # A budget the step exceeds: reported as not fitting.
    lines = []
    assert not plan.report(config, "cpu:8", plan.Target("", 1e-6), devices, programs, lines.append)
    assert "| NO |" in lines[3]
  # Replicated weights on every device under dp; an eighth of most of them under fsdp.
  assert arguments["fsdp"] < 0.5 * arguments["dp"]


def test_adapter_gradients_are_reduced_across_devices_in_float32():
  # Compiled for TPU ahead of time (XLA:CPU computes bf16 in float32 and would hide it):
  # a bf16 model's data-parallel step sums LoRA A and B gradients over devices in float32.
  devices, _ = plan.target_devices("v5e-8")
  config = tiny_config(
    **{
      "mesh.rules_preset": "dp",
      "mesh.shape": (("data", 8),),
      "model.dtype": "bfloat16",
      "model.param_dtype": "bfloat16",
      "adapter.targets": ("q_proj", "v_proj"),
    }
  )
  text = plan.lower(config, devices)["train step"].compile().as_text()
  reduced = collections.Counter()
  for line in text.splitlines():
    if " all-reduce(" in line or " all-reduce-start(" in line:
      reduced.update(re.findall(r"(bf16|f32|s32)\[", line.split(" all-reduce")[0]))
  assert reduced["f32"] > 0 and reduced["bf16"] == 0, reduced


def test_model_flops_count_every_matmul_once_forward_and_as_the_backward_needs():
  # Qwen3 hidden 1024, 4 layers, 16 heads / 8 kv of 64, MLP 3072; CuMA on q and v: 8 experts
  # of rank 64, router hidden 32 over the hidden state and an 8-wide profile; batch 4 x 256.
  hf = transformers.Qwen3Config(
    hidden_size=1024,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=64,
    intermediate_size=3072,
    vocab_size=8192,
  )
  config = tiny_config(
    **{
      "adapter.targets": ("q_proj", "v_proj"),
      "adapter.num_experts": 8,
      "adapter.rank": 64,
      "adapter.router_hidden": (32,),
      "adapter.demographic_dim": 8,
      "data.batch_size": 4,
      "data.max_length": 256,
      "eval.batch_size": 16,
    }
  )
  frozen = 1024 * 1024 * 2 + 2 * 1024 * 512 + 3 * 1024 * 3072  # q, o, k, v, MLP: MACs/token
  lora = 8 * (1024 * 64 + 64 * 1024) + 8 * (1024 * 64 + 64 * 512)
  routers = 2 * (1024 * 32 + 8 * 32 + 32 * 8)
  attention = 2 * 256 * 1024  # scores and values over 256 keys, 16 x 64 wide
  per_layer_train = 2 * frozen + 3 * (lora + routers) + 3 * attention
  flops = plan.model_flops(config, ModelConfig.from_hf(hf))
  assert flops["train step"] == 2 * 4 * 256 * 4 * per_layer_train
  assert flops["eval step"] == 2 * 16 * 256 * 4 * (frozen + lora + routers + attention)
