"""Forward+backward cost of a CuMA-adapted projection vs the frozen one, at Qwen3-8B shapes.

    python experiments/bench/layer.py [--json] [--repeats N] [--tokens T]

Times, on the default JAX backend, one jitted forward + backward (``jax.vjp`` with a fixed
random cotangent: gradient w.r.t. the input x AND every trainable parameter; the frozen
W0 only lets the gradient through) of:
  base_q     x @ W0, q_proj 4096 -> 4096 (W0 frozen: gradient w.r.t. x only)
  lora_q     base + plain LoRA r=64
  cuma_q_*   base + CuMA, strategy dense/ragged/auto: the decoder's own adapter block
             (AdapterGroup: router, top-k, LoRA experts, balance loss with lambda 0.01)
  base_qv / cuma_qv   the attention input block: q (4096) and v (1024) projections of the
             same x, CuMA with ONE router shared by both, evaluated once
  sweep      the adapter alone (router + mixture) at 8, 16, 32, 64 experts, dense and ragged
CuMA: 8 experts, top-2, rank 64, alpha 128, shared A, reference gates, demographic width
1024, router MLP (256,). float32 throughout. Timings are medians over ``--repeats`` rounds
(cases interleaved, so a load change on a shared machine hits every case alike), after a
warm-up call that also compiles. Each ratio comes with its arithmetic floor: the same
ratio of fwd+bwd FLOP counts, where the adapter runs only the k selected experts
("floor") or all N as the dense path does ("dense_floor").
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cuma_jax import platforms
from cuma_jax.layers.adapter_config import AdapterConfig
from cuma_jax.layers.dispatch import resolve_strategy
from cuma_jax.layers.group import AdapterGroup
from cuma_jax.sharding import EMBED, HEADS, KV_HEADS

D_MODEL, D_Q, D_V = 4096, 4096, 1024
RANK, ALPHA, TOP_K, EXPERTS, D_DEMO, ROUTER_HIDDEN = 64, 128.0, 2, 8, 1024, (256,)
LAMBDA_AUX = 0.01
SWEEP_EXPERTS = (8, 16, 32, 64)


def _random(rng, shape, scale=1.0):
  return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


def _randomise(tree, rng):
  """Random values for every parameter (B starts at zero: routing would be all ties)."""
  return jax.tree.map(lambda v: _random(rng, v.shape, 0.02), tree)


def _fwd_bwd(fn):
  """jit(x, params, frozen, z, cotangent) -> (outputs, grads w.r.t. x and params)."""

  def step(x, params, frozen, z, cotangent):
    out, vjp = jax.vjp(lambda x, p: fn(x, p, frozen, z), x, params)
    return out, vjp(cotangent)

  return jax.jit(step)


class Cases:
  """Builds every benchmarked function with its inputs; all share x, z and W0."""

  def __init__(self, tokens: int, seed: int = 0):
    self.rng = np.random.default_rng(seed)
    self.x = _random(self.rng, (1, tokens, D_MODEL))
    self.z = _random(self.rng, (1, D_DEMO))
    self.frozen = {
      "q": _random(self.rng, (D_MODEL, D_Q), 0.02),
      "v": _random(self.rng, (D_MODEL, D_V), 0.02),
    }
    self.cot = {"q": _random(self.rng, (1, tokens, D_Q)), "v": _random(self.rng, (1, tokens, D_V))}

  def _case(self, fn, params, targets, balance_weight=None):
    """``balance_weight``: the balance loss's cotangent (lambda_aux) when fn returns it."""
    cot = {t: self.cot[t] for t in targets}
    if balance_weight is not None:
      cot["balance"] = jnp.float32(balance_weight)
    step = _fwd_bwd(fn)
    args = (self.x, params, self.frozen, self.z, cot)
    return lambda: jax.block_until_ready(step(*args))

  def base(self, targets):
    fn = lambda x, p, w, z: {t: x @ w[t] for t in targets}
    return self._case(fn, {}, targets)

  def lora(self):
    params = {
      "a": _random(self.rng, (D_MODEL, RANK), 0.01),
      "b": _random(self.rng, (RANK, D_Q), 0.01),
    }
    fn = lambda x, p, w, z: {"q": x @ w["q"] + (ALPHA / RANK) * ((x @ p["a"]) @ p["b"])}
    return self._case(fn, params, ("q",))

  def _group(self, targets, strategy, num_experts):
    """The decoder's adapter block for the attention input: one router shared by q and v."""
    adapter = AdapterConfig(
      targets=tuple(f"{t}_proj" for t in targets),
      rank=RANK,
      alpha=ALPHA,
      num_experts=num_experts,
      top_k=TOP_K,
      shared_a=True,
      router_hidden=ROUTER_HIDDEN,
      demographic_dim=D_DEMO,
      share_router=True,
      gate="softmax_top_probs",
      strategy=strategy,
    )
    group = AdapterGroup(adapter=adapter, group="attn_in", dtype=jnp.float32, deterministic=True)
    outputs = {
      f"{t}_proj": ({"q": D_Q, "v": D_V}[t], {"q": HEADS, "v": KV_HEADS}[t]) for t in targets
    }
    params = jax.jit(lambda key: group.init(key, self.x[:, :1], self.z, None, outputs, EMBED))(
      jax.random.PRNGKey(0)
    )["params"]
    params = _randomise(nn.unbox(params), self.rng)

    def deltas(x, p, z):
      out, aux = group.apply({"params": p}, x, z, None, outputs, EMBED)
      return {t: out[f"{t}_proj"] for t in targets}, aux["balance_loss"]

    return deltas, params

  def cuma(self, targets, strategy, num_experts=EXPERTS):
    """Frozen projections + CuMA deltas (+ the balance loss's gradient)."""
    deltas, params = self._group(targets, strategy, num_experts)

    def fn(x, p, w, z):
      delta, balance = deltas(x, p, z)
      return {**{t: x @ w[t] + delta[t] for t in targets}, "balance": balance}

    return self._case(fn, params, targets, LAMBDA_AUX)

  def adapter_only(self, strategy, num_experts):
    """Router + mixture alone (no frozen projection), to isolate the experts' scaling."""
    deltas, params = self._group(("q",), strategy, num_experts)

    def fn(x, p, w, z):
      delta, balance = deltas(x, p, z)
      return {"q": delta["q"], "balance": balance}

    return self._case(fn, params, ("q",), LAMBDA_AUX)


def flops(tokens, targets, adapter, experts_run=None, num_experts=EXPERTS):
  """fwd+bwd FLOPs: a matmul m x k x n costs 2mkn forward; backward costs 2mkn per
  requested gradient (input and/or weight). W0 is frozen: no weight gradient."""
  d_out = {"q": D_Q, "v": D_V}
  mm = lambda k, n, grads: 2 * tokens * k * n * (1 + grads)
  total = sum(mm(D_MODEL, d_out[t], 1) for t in targets)
  if adapter == "lora":
    total += mm(D_MODEL, RANK, 2) + mm(RANK, D_Q, 2)
  elif adapter == "cuma":
    widths = (D_MODEL, *ROUTER_HIDDEN, num_experts)
    total += sum(mm(i, o, 2) for i, o in itertools.pairwise(widths))
    for t in targets:
      total += mm(D_MODEL, RANK, 2) + mm((experts_run or TOP_K) * RANK, d_out[t], 2)
  return total


def measure(cases: dict, repeats: int) -> dict:
  """{case: [ms per round]}. Cases run in turn within each round, so the per-round
  ratios compare runs that saw the same machine load (other jobs share the CPU)."""
  for run in cases.values():
    run()  # compile + warm up
  times = {name: [] for name in cases}
  for _ in range(repeats):
    for name, run in cases.items():
      start = time.perf_counter()
      run()
      times[name].append(1e3 * (time.perf_counter() - start))
  return times


def ratio(times: dict, num: str, den: str) -> float:
  """Median over rounds of num/den, each round's pair measured back to back."""
  return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def main():
  platforms.skip_absent_tpu()  # no libtpu start-up errors on a CPU machine
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--tokens", type=int, default=1024)
  args = parser.parse_args()
  if args.repeats < 5:
    parser.error("--repeats must be >= 5")

  c = Cases(args.tokens)
  auto = resolve_strategy(
    "auto",
    backend=jax.default_backend(),
    num_tokens=args.tokens,
    num_experts=EXPERTS,
    rank=RANK,
    top_k=TOP_K,
  )
  groups = [
    {
      "base_q": c.base(("q",)),
      "lora_q": c.lora(),
      "cuma_q_auto": c.cuma(("q",), "auto"),
      "cuma_q_dense": c.cuma(("q",), "dense"),
      "cuma_q_ragged": c.cuma(("q",), "ragged"),
    },
    {"base_qv": c.base(("q", "v")), "cuma_qv": c.cuma(("q", "v"), "auto")},
    *(
      {f"adapter_{s}_e{n}": c.adapter_only(s, n) for n in SWEEP_EXPERTS}
      for s in ("dense", "ragged")
    ),
  ]
  times = {}
  for group in groups:
    times.update(measure(group, args.repeats))

  f = functools.partial(flops, args.tokens)
  adapter_flops = lambda n, run: f(("q",), "cuma", run, n) - f(("q",), None)
  result = {
    "backend": jax.default_backend(),
    "dtype": "float32",
    "tokens": args.tokens,
    "repeats": args.repeats,
    "auto_strategy": auto,
    "cuma_over_base_q": ratio(times, "cuma_q_auto", "base_q"),
    "cuma_dense_over_base_q": ratio(times, "cuma_q_dense", "base_q"),
    "cuma_ragged_over_base_q": ratio(times, "cuma_q_ragged", "base_q"),
    "cuma_over_base_qv": ratio(times, "cuma_qv", "base_qv"),
    "lora_over_base_q": ratio(times, "lora_q", "base_q"),
    "ragged_e64_over_e8": ratio(times, "adapter_ragged_e64", "adapter_ragged_e8"),
    "dense_e64_over_e8": ratio(times, "adapter_dense_e64", "adapter_dense_e8"),
    "cuma_over_base_q_floor": f(("q",), "cuma") / f(("q",), None),
    "cuma_over_base_q_dense_floor": f(("q",), "cuma", EXPERTS) / f(("q",), None),
    "cuma_over_base_qv_floor": f(("q", "v"), "cuma") / f(("q", "v"), None),
    "cuma_over_base_qv_dense_floor": f(("q", "v"), "cuma", EXPERTS) / f(("q", "v"), None),
    "lora_over_base_q_floor": f(("q",), "lora") / f(("q",), None),
    "ragged_e64_over_e8_floor": adapter_flops(64, TOP_K) / adapter_flops(8, TOP_K),
    "dense_e64_over_e8_floor": adapter_flops(64, 64) / adapter_flops(8, 8),
    "ms": {name: statistics.median(ts) for name, ts in times.items()},
  }
  if args.json:
    print(json.dumps(result, sort_keys=True))
    return
  for key, value in result.items():
    if key != "ms":
      print(f"{key:32s} {value:.3f}" if isinstance(value, float) else f"{key:32s} {value}")
  for name, value in result["ms"].items():
    print(f"  {name:28s} {value:9.1f} ms")


if __name__ == "__main__":
  main()
