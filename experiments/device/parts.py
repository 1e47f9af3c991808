"""The measurements of experiments/device/run.py, one function per part.

Each part takes ``smoke`` (tiny shapes on the CPU, the same code) and returns
``(result, table)``: a JSON-able dict and a markdown table. Shapes on an accelerator: the
training step of a Qwen3-1.7B-sized model with random weights in bfloat16, batch 4 x 1024,
CuMA rank 64 on q_proj and v_proj, 8 experts, top-2 (the config's defaults otherwise: a
router per target with hidden 256, per-expert A, demographic width 1024).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "experiments", "bench"))

import generate as bench_generate  # noqa: E402
import step as bench_step  # noqa: E402

from cuma_jax import plan, runtime, schema  # noqa: E402
from cuma_jax.layers.adapter_config import AdapterConfig  # noqa: E402
from cuma_jax.layers.dispatch import resolve_strategy  # noqa: E402
from cuma_jax.layers.group import AdapterGroup  # noqa: E402
from cuma_jax.sharding import EMBED, HEADS, KV_HEADS  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) by a substring of device_kind,
# most specific first: the denominators of MFU.
BF16_PEAK_TFLOPS = (
  ("H100 PCIe", 756.0),
  ("H100 NVL", 835.0),
  ("H100", 989.4),
  ("H200", 989.4),
  ("A100", 312.0),
)
TEST_FILES = (
  "tests/test_decoder.py",
  "tests/test_dispatch.py",
  "tests/test_adapter.py",
  "tests/test_generation.py",
  "tests/test_device.py",
)
SWEEP_EXPERTS = (8, 16, 32, 64)
SMOKE_SWEEP_EXPERTS = (4, 8)


def _shape(smoke: bool) -> dict:
  """The step's config overrides: Qwen3-1.7B in bf16, or the tiny backbone for the smoke."""
  if smoke:
    return {
      "model.architecture": schema.TINY,
      "model.dtype": "bfloat16",
      "model.param_dtype": "bfloat16",
      "model.scan_layers": True,
      "data.batch_size": 2,
      "data.max_length": 32,
      "adapter.demographic_dim": 16,
      "adapter.router_hidden": (16,),
      "adapter.rank": 8,
      "adapter.alpha": 16.0,
    }
  return {
    "model.architecture": "qwen3-1.7b",
    "model.dtype": "bfloat16",
    "model.param_dtype": "bfloat16",
    "model.scan_layers": True,
    "data.batch_size": 4,
    "data.max_length": 1024,
    "adapter.demographic_dim": 1024,
    "adapter.router_hidden": (256,),
  }


def _config(method: str, strategy: str, smoke: bool):
  shape = _shape(smoke)
  return bench_step.step_config(
    method,
    batch=shape["data.batch_size"],
    overrides={**shape, "adapter.strategy": strategy},
  )


def _table(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def _device():
  return jax.devices()[0]


def bf16_peak() -> tuple[float | None, str]:
  """(FLOP/s, where the number comes from) of the first device in bfloat16."""
  kind = _device().device_kind
  for name, tflops in BF16_PEAK_TFLOPS:
    if name in kind:
      return tflops * 1e12, f"{kind}: {tflops:g} TFLOP/s dense bf16 (datasheet)"
  return None, f"{kind}: no datasheet peak known"


def matmul_rate(n: int, dtype, repeats: int = 10) -> float:
  """Measured FLOP/s of an n x n x n matmul in ``dtype``, median of ``repeats``."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
  product = jax.jit(lambda a: a @ a)
  jax.block_until_ready(product(a))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(product(a))
    times.append(time.perf_counter() - start)
  return 2.0 * n**3 / statistics.median(times)


# ----------------------------------------------------------------------------- parts


def environment(smoke: bool):
  import torch

  device = _device()
  peak, source = bf16_peak()
  measured = matmul_rate(256 if smoke else 8192, jnp.bfloat16)
  result = {
    "python": platform.python_version(),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "device_kind": device.device_kind,
    "torch": torch.__version__,
    "torch_cuda": torch.cuda.is_available(),
    "bf16_peak_flops": peak,
    "bf16_peak_source": source,
    "bf16_matmul_flops_measured": measured,
  }
  rows = [(k, v) for k, v in result.items()]
  return result, _table(("what", "value"), rows)


def tests(smoke: bool):
  """The ``device`` tests, on this backend (smoke: only collected)."""
  env = dict(os.environ)
  if not smoke:
    # The suite's conftest would pin the CPU and its compile flags.
    env.update(JAX_PLATFORMS="", XLA_FLAGS="")
  junit = os.path.join(os.environ["DEVICE_RUN_OUT"], "tests.xml")
  command = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider"]
  command += ["-m", "device", f"--junitxml={junit}", *TEST_FILES]
  if smoke:
    command.append("--collect-only")
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
  lines = (done.stdout + done.stderr).strip().splitlines()
  tail = lines[-40:]
  if smoke:  # collected only: the junit file lists no test cases
    cases = [{"name": n, "outcome": "collected", "seconds": 0.0} for n in lines if "::" in n]
  else:
    cases = _junit_cases(junit)
  result = {"returncode": done.returncode, "summary": tail[-1] if tail else "", "cases": cases}
  if done.returncode != 0:
    result["output_tail"] = tail
  rows = [(c["name"], c["outcome"], f"{c['seconds']:.1f}") for c in cases]
  table = f"pytest: {result['summary']}\n\n" + _table(("test", "outcome", "s"), rows)
  if smoke and done.returncode == 0 and "collected" not in result["summary"]:
    raise RuntimeError(f"pytest collected nothing: {result['summary']}")
  if done.returncode != 0:
    raise RuntimeError(f"pytest exited {done.returncode}: {result['summary']}")
  return result, table


def _junit_cases(path: str) -> list[dict]:
  import xml.etree.ElementTree as ET

  if not os.path.exists(path):
    return []
  cases = []
  for case in ET.parse(path).getroot().iter("testcase"):
    outcome = "passed"
    for tag in ("failure", "error", "skipped"):
      if case.find(tag) is not None:
        outcome = tag
    name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
    cases.append({"name": name, "outcome": outcome, "seconds": float(case.get("time", 0))})
  return cases


def _mfu_rows(configs: dict, model_config, seconds: dict, peak: float | None, measured: float):
  result, rows = {}, []
  for name, config in configs.items():
    tokens = config.data.batch_size * config.data.max_length
    flops = plan.model_flops(config, model_config)["train step"]
    rate = flops / seconds[name]
    result[name] = {
      "step_s": seconds[name],
      "tokens_per_s": tokens / seconds[name],
      "model_tflop_per_step": flops / 1e12,
      "model_tflops": rate / 1e12,
      "mfu": rate / peak if peak else None,
      "fraction_of_measured_matmul": rate / measured,
    }
    r = result[name]
    rows.append(
      (
        name,
        f"{r['step_s'] * 1e3:.1f}",
        f"{r['tokens_per_s']:.0f}",
        f"{r['model_tflops']:.3g}",
        "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
        f"{100 * r['fraction_of_measured_matmul']:.1f}%",
      )
    )
  return result, rows


def step(smoke: bool):
  """The jitted training step (forward, backward, AdamW) for LoRA, CuMA dense, CuMA ragged."""
  configs = {
    "LoRA r64": _config("lora", "dense", smoke),
    "CuMA dense": _config("cuma", "dense", smoke),
    "CuMA ragged": _config("cuma", "ragged", smoke),
  }
  model_config = runtime.architecture(configs["CuMA dense"])
  runs = {name: bench_step.build(c, model_config=model_config)[0] for name, c in configs.items()}
  seconds = bench_step.medians(bench_step.time_rounds(runs, 3 if smoke else 10)[0])
  peak, source = bf16_peak()
  measured = matmul_rate(256 if smoke else 8192, jnp.bfloat16)
  rows_result, rows = _mfu_rows(configs, model_config, seconds, peak, measured)
  first = configs["CuMA dense"]
  result = {
    "shape": _shape(smoke),
    "peak": source,
    "bf16_matmul_tflops_measured": measured / 1e12,
    "rows": rows_result,
  }
  header = ("step", "ms", "tokens/s", "model TFLOP/s", "MFU", "of measured bf16 matmul")
  intro = (
    f"{model_config.num_layers} layers, d {model_config.hidden_size}, batch "
    f"{first.data.batch_size} x {first.data.max_length}, bf16; {source}; measured bf16 matmul "
    f"{measured / 1e12:.1f} TFLOP/s\n\n"
  )
  return result, intro + _table(header, rows)


def _sweep_case(num_experts: int, strategy: str, x, z, frozen, cot, rank: int, demo: int):
  """fwd+bwd of the attention input's q and v: frozen projections plus CuMA deltas."""
  adapter = AdapterConfig(
    targets=("q_proj", "v_proj"),
    rank=rank,
    alpha=2.0 * rank,
    num_experts=num_experts,
    top_k=2,
    router_hidden=(256,),
    demographic_dim=demo,
    strategy=strategy,
  )
  group = AdapterGroup(adapter=adapter, group="attn_in", dtype=x.dtype, deterministic=True)
  outputs = {"q_proj": (frozen["q"].shape[1], HEADS), "v_proj": (frozen["v"].shape[1], KV_HEADS)}
  params = jax.jit(lambda key: group.init(key, x[:, :1], z, None, outputs, EMBED))(
    jax.random.key(num_experts)
  )["params"]
  rng = np.random.default_rng(num_experts)
  params = jax.tree.map(
    lambda v: jnp.asarray(rng.normal(size=v.shape) * 0.02, v.dtype), nn.unbox(params)
  )

  def loss(x, params):
    deltas, aux = group.apply({"params": params}, x, z, None, outputs, EMBED)
    ys = {t: x @ frozen[t[0]] + deltas[t] for t in outputs}
    total = sum(jnp.sum((ys[t] * cot[t[0]]).astype(jnp.float32)) for t in outputs)
    return total + 0.01 * aux["balance_loss"]

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return lambda: grad(x, params)


def dispatch_sweep(smoke: bool):
  """Ragged against dense dispatch for 8 to 64 experts: the attention input's q and v
  (frozen projections + CuMA, forward and backward) at the step's token count."""
  shape = _shape(smoke)
  model_config = runtime.architecture(_config("cuma", "dense", smoke))
  d, heads = model_config.hidden_size, model_config.num_heads
  d_q, d_v = heads * model_config.head_dim, model_config.num_kv_heads * model_config.head_dim
  rows_count, length = shape["data.batch_size"], shape["data.max_length"]
  dtype = jnp.dtype(shape["model.dtype"])
  rank, demo = (8, 16) if smoke else (64, 1024)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(rows_count, length, d)), dtype)
  z = jnp.asarray(rng.normal(size=(rows_count, demo)), jnp.float32)
  frozen = {
    k: jnp.asarray(rng.normal(size=(d, n)) * 0.02, dtype) for k, n in (("q", d_q), ("v", d_v))
  }
  cot = {
    k: jnp.asarray(rng.normal(size=(rows_count, length, n)), dtype)
    for k, n in (("q", d_q), ("v", d_v))
  }
  experts = SMOKE_SWEEP_EXPERTS if smoke else SWEEP_EXPERTS
  runs = {
    (n, s): _sweep_case(n, s, x, z, frozen, cot, rank, demo)
    for n in experts
    for s in ("dense", "ragged")
  }
  seconds = bench_step.medians(bench_step.time_rounds(runs, 3 if smoke else 10)[0])
  backend = jax.default_backend()
  result, rows = {"tokens": rows_count * length, "rank": rank, "by_experts": {}}, []
  for n in experts:
    dense, ragged = seconds[(n, "dense")], seconds[(n, "ragged")]
    auto = resolve_strategy(
      "auto", backend=backend, num_tokens=rows_count * length, num_experts=n, rank=rank, top_k=2
    )
    faster = "ragged" if ragged < dense else "dense"
    result["by_experts"][n] = {
      "dense_ms": dense * 1e3,
      "ragged_ms": ragged * 1e3,
      "faster": faster,
      "auto_picks": auto,
    }
    rows.append((n, f"{dense * 1e3:.2f}", f"{ragged * 1e3:.2f}", faster, auto))
  header = ("experts", "dense (ms)", "ragged (ms)", "faster", "auto picks")
  return result, _table(header, rows)


def memory(smoke: bool):
  """The plan's per-device memory of the CuMA dense step against the measured peak."""
  config = _config("cuma", "dense", smoke)
  devices = jax.devices()[:1]
  (program,) = plan.compile_programs({"train step": plan.lower(config, devices)["train step"]})
  run, _ = bench_step.build(config, model_config=runtime.architecture(config))
  stats = _device().memory_stats()  # None on the CPU
  before = dict(stats) if stats else {}
  jax.block_until_ready(run())
  jax.block_until_ready(run())
  after = _device().memory_stats() or {}
  peak = after.get("peak_bytes_in_use")
  result = {
    "predicted_total_bytes": program.total,
    "predicted": {
      "arguments": program.arguments,
      "outputs_not_aliased": program.outputs - program.aliased,
      "temporaries": program.temporaries,
    },
    "measured_peak_bytes": peak,
    "bytes_in_use_before_step": before.get("bytes_in_use"),
    "peak_bytes_before_step": before.get("peak_bytes_in_use"),
    "measured_over_predicted": peak / program.total if peak else None,
  }

  def gib(size):
    return "n/a (no memory_stats on this backend)" if size is None else f"{size / 2**30:.3f}"

  rows = [
    ("plan: arguments", gib(program.arguments)),
    ("plan: outputs (not donated)", gib(program.outputs - program.aliased)),
    ("plan: temporaries", gib(program.temporaries)),
    ("plan: total", gib(program.total)),
    ("measured: in use before the step", gib(result["bytes_in_use_before_step"])),
    ("measured: peak before the step (weights' init)", gib(result["peak_bytes_before_step"])),
    ("measured: peak after two steps", gib(peak)),
  ]
  return result, _table(("CuMA dense step, per device", "GiB"), rows)


def decode(smoke: bool):
  """Greedy decode tokens/s of ours against Hugging Face ``generate`` on the same card."""
  import torch

  if smoke:
    model = {**bench_generate.MODEL, "hidden_size": 64, "intermediate_size": 128}
    model.update(num_hidden_layers=2, vocab_size=512, num_attention_heads=2)
    model.update(num_key_value_heads=1, head_dim=32)
    batch, new, repeats = 2, 8, 1
  else:
    # Qwen3-0.6B's shape (random weights), float32 at full matmul precision on both sides.
    model = {**bench_generate.MODEL, **_qwen3_0_6b()}
    batch, new, repeats = 8, 64, 2
  torch_device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  result = bench_generate.measure(
    model, batch, repeats, new=new, torch_device=torch_device, scan_layers=True
  )
  result["torch_device"] = torch_device
  rows = [
    (name, f"{result[name]['prefill_s'] * 1e3:.1f}", f"{result[name]['decode_tokens_per_s']:.0f}")
    for name in ("ours", "ours_cuma", "hf")
  ]
  intro = (
    f"batch {batch}, prompt {bench_generate.PROMPT}, {new} new tokens, Hugging Face on "
    f"{torch_device}; tokens equal: {100 * result['tokens_equal']:.1f}%\n\n"
  )
  return result, intro + _table(("generator", "prefill (ms)", "decode tokens/s"), rows)


def _qwen3_0_6b() -> dict:
  import json

  with open(os.path.join(schema.ARCHITECTURES_DIR, "qwen3-0.6b.json")) as f:
    config = json.load(f)
  keys = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
  )
  return {k: config[k] for k in keys}


PARTS = {
  "environment": environment,
  "tests": tests,
  "step": step,
  "dispatch_sweep": dispatch_sweep,
  "memory": memory,
  "decode": decode,
}
