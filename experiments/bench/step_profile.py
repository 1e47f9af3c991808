"""Where the benchmarked step's time goes on XLA:CPU, part by part of the model.

    python experiments/bench/step_profile.py [--layout released] [--method cuma] [--steps 3]

Traces ``--steps`` runs of experiments/bench/step.py's step (and as many 2048 x 2048 float32
matmuls) with ``jax.profiler``, takes each op's time from the trace, and its FLOPs and source
line (``op_name``) from the compiled program, which XLA dumps as text. Prints the op time
per step summed over the thread pool's threads, by part: the frozen backbone's
projections, attention's other work, the LoRA experts, the routers, the rest; each with
its GFLOP and its GFLOP per second of op time beside the matmul's. An op's time is how long
it ran on its thread, waits for a core included: on a shared machine compare the shares
of one run, not rates across runs.
"""

from __future__ import annotations

import argparse
import collections
import glob
import math
import os
import re
import tempfile

DUMP = tempfile.mkdtemp(prefix="step-profile-")
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP} --xla_dump_hlo_as_text"
)

import jax  # noqa: E402
from jax.profiler import ProfileData  # noqa: E402
import step as bench_step  # noqa: E402

from cuma_jax import platforms  # noqa: E402

# (part, pattern of the op_name), first match wins.
PARTS = (
  ("routers", r"_router/"),
  ("LoRA experts (A, B, gates)", r"_lora/"),
  ("routing (top-k, gates, balance loss)", r"adapters_\w+/"),
  ("backbone projections", r"(q|k|v|o|gate|up|down)_proj/dot_general"),
  ("attention, other than projections", r"self_attn/"),
  ("copies of frozen weights", r"^frozen\["),
  ("MLP activation", r"/mlp/"),
  ("norms", r"layernorm|/norm/"),
  ("loss, embeddings, optimizer, other", r""),
)


def _shape(text: str) -> list[int]:
  return [int(d) for d in re.match(r"\w+\[([\d,]*)\]", text).group(1).split(",") if d]


def hlo_ops(text: str) -> dict[str, tuple[float, str]]:
  """{instruction name: (its matmul FLOPs, its op_name)} of a compiled HLO module's text."""
  shapes = {m.group(1): m.group(2) for m in re.finditer(r"%?([\w.\-]+) = (\w+\[[\d,]*\])", text)}
  for params in re.finditer(r"\(([^()]*)\) ->", text):
    for p in re.finditer(r"([\w.\-]+): (\w+\[[\d,]*\])", params.group(1)):
      shapes[p.group(1)] = p.group(2)
  ops = {}
  line = re.compile(r"^\s*%?(\S+) = (\S+) ([\w\-]+)\((.*?)\)(.*)$", re.M)
  for m in line.finditer(text):
    name, _, _, _, rest = m.groups()
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    body = m.group(0)
    if called:
      found = re.search(r"^%?" + re.escape(called.group(1)) + r" \(.*?^\}", text, re.M | re.S)
      body = found.group(0) if found else ""
    flops = 0.0
    dots = (
      r"= (\w+\[[\d,]*\])\S* dot\(%?([\w.\-]+), %?[\w.\-]+\),.*?lhs_contracting_dims=\{([\d,]*)\}"
    )
    for out, lhs, contracting in re.findall(dots, body):
      lhs_shape = _shape(shapes.get(lhs, "f32[]"))
      k = math.prod(lhs_shape[int(i)] for i in contracting.split(",") if i) if lhs_shape else 0
      flops += 2.0 * math.prod(_shape(out)) * k
    op_name = re.search(r'op_name="([^"]+)"', rest)
    ops[name] = (flops, op_name.group(1) if op_name else "")
  return ops


def op_times(trace_dir: str) -> collections.Counter:
  """{op name: nanoseconds, summed over the XLA:CPU threads} of a trace."""
  (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  times = collections.Counter()
  for plane in ProfileData.from_file(path).planes:
    for line in plane.lines:
      if line.name.startswith("tf_XLA"):
        for event in line.events:
          if "Execute" not in event.name and "Await" not in event.name:
            times[event.name] += event.duration_ns
  return times


def _module(pattern: str) -> str:
  paths = glob.glob(os.path.join(DUMP, f"*{pattern}*cpu_after_optimizations.txt"))
  return open(max(paths, key=os.path.getsize)).read()


def main():
  platforms.skip_absent_tpu()  # no libtpu start-up errors on a CPU machine
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layout", choices=tuple(bench_step.LAYOUTS), default="released")
  parser.add_argument("--method", choices=("cuma", "lora"), default="cuma")
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  run, _ = bench_step.build(bench_step.step_config(args.method, layout=args.layout))
  product, product_flops = bench_step.matmul()
  for fn in (run, product, run, product):  # compile and warm up
    jax.block_until_ready(fn())
  traces = {name: tempfile.mkdtemp(prefix=f"{name}-trace-") for name in ("matmul", "step")}
  for name, fn in (("matmul", product), ("step", run)):
    with jax.profiler.trace(traces[name]):
      for _ in range(args.steps):
        jax.block_until_ready(fn())
  matmul_ns = sum(op_times(traces["matmul"]).values())
  times = op_times(traces["step"])
  ops = hlo_ops(_module("full_step"))
  by_part = collections.defaultdict(lambda: [0.0, 0.0])
  for name, ns in times.items():
    flops, op_name = ops.get(name, (0.0, ""))
    source = re.sub(r"^jit\(\w+\)/", "", op_name)
    part = next(p for p, pattern in PARTS if re.search(pattern, source))
    by_part[part][0] += ns / args.steps
    by_part[part][1] += flops / args.steps
  total = sum(ns for ns, _ in by_part.values())
  print(f"{args.method} step, layout {args.layout}: {total / 1e6:.0f} ms of op time per step")
  print(f"2048^3 matmul: {product_flops * args.steps / matmul_ns:.1f} GFLOP per second of op time")
  print("| part | op time (ms) | share | GFLOP | GFLOP per second of op time |")
  print("|---|---|---|---|---|")
  for part, (ns, flops) in sorted(by_part.items(), key=lambda kv: -kv[1][0]):
    rate = f"{flops / ns:.1f}" if flops else ""
    print(f"| {part} | {ns / 1e6:.0f} | {100 * ns / total:.1f}% | {flops / 1e9:.2f} | {rate} |")


if __name__ == "__main__":
  main()
