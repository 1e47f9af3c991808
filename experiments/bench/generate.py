"""Decode speed of cuma_jax's cached generation against Hugging Face ``generate``.

    python experiments/bench/generate.py [--json] [--repeats N] [--batch B]

A random small Qwen3 (hidden 512, 4 layers, 8 heads / 4 kv heads, head_dim 64, MLP 1536,
vocab 8192; built locally, float32) continues a batch of 64-token prompts by 64 tokens,
greedily, without stop tokens. Reported, as medians over ``--repeats`` interleaved rounds
after a compiling warm-up: prefill and decode time of ours, without adapters and with CuMA
(q_proj + v_proj, 8 experts, top-2, rank 16, router hidden 64, demographic width 32), and
Hugging Face's ``generate`` on the same weights (torch, CPU) — decode tokens/s and the ratio
ours / Hugging Face, measured in the same run.  Both produce identical tokens (checked).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from cuma_jax import generation, platforms
from cuma_jax.layers.adapter_config import AdapterConfig
from cuma_jax.models.pretrained import load_pretrained

MODEL = dict(
  vocab_size=8192,
  hidden_size=512,
  intermediate_size=1536,
  num_hidden_layers=4,
  num_attention_heads=8,
  num_key_value_heads=4,
  head_dim=64,
  max_position_embeddings=512,
  tie_word_embeddings=True,
)
PROMPT, NEW = 64, 64
CUMA = AdapterConfig(
  targets=("q_proj", "v_proj"),
  rank=16,
  alpha=32.0,
  num_experts=8,
  top_k=2,
  router_hidden=(64,),
  demographic_dim=32,
)


def _timed(fn):
  start = time.perf_counter()
  result = fn()
  return time.perf_counter() - start, result


def measure(
  model: dict,
  batch: int,
  repeats: int,
  *,
  new: int = NEW,
  torch_device: str = "cpu",
  scan_layers: bool = False,
) -> dict:
  """Prefill and decode times of ours (plain and CuMA) and of Hugging Face's ``generate``
  for a random Qwen3 of ``model``'s shape, and the fraction of tokens both generate alike
  (``tokens_equal``). Hugging Face runs on ``torch_device``, ours on JAX's default backend;
  in float32 at full matmul precision on both. ``scan_layers``: ours with its layers scanned
  (one compiled layer, for deep models)."""
  torch.manual_seed(0)
  with torch.device(torch_device):
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**model)).eval()
  rng = np.random.default_rng(0)
  ids = rng.integers(1, model["vocab_size"], (batch, PROMPT))
  mask = np.ones_like(ids)
  z = rng.normal(size=(batch, CUMA.demographic_dim)).astype(np.float32)
  with tempfile.TemporaryDirectory() as directory:
    hf.save_pretrained(directory)
    plain = load_pretrained(directory, scan_layers=scan_layers)
    cuma = load_pretrained(directory, scan_layers=scan_layers, adapter=CUMA, rng=jax.random.key(0))

  def ours(model, demographics, new_tokens):
    module, params = model
    s = generation.SamplingConfig(max_new_tokens=new_tokens)
    with jax.default_matmul_precision("highest"):
      tokens = generation.generate(module, params, ids, mask, s, demographics=demographics).tokens
    return np.asarray(tokens)

  def hf_generate(new_tokens):
    with torch.no_grad():
      out = hf.generate(
        torch.as_tensor(ids, device=torch_device),
        attention_mask=torch.as_tensor(mask, device=torch_device),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
      )
    return out[:, PROMPT:].cpu().numpy()

  # Prefill time = a 1-token generation; decode time = the rest of a full one.
  cases = {
    "ours": lambda n: ours(plain, None, n),
    "ours_cuma": lambda n: ours(cuma, z, n),
    "hf": hf_generate,
  }
  for fn in cases.values():  # compile / warm up both lengths
    fn(1), fn(new)
  tokens_equal = float(np.mean(cases["ours"](new) == cases["hf"](new)))
  times = {name: {"prefill": [], "full": []} for name in cases}
  for _ in range(repeats):
    for name, fn in cases.items():
      times[name]["prefill"].append(_timed(functools.partial(fn, 1))[0])
      times[name]["full"].append(_timed(functools.partial(fn, new))[0])
  result = {"batch": batch, "prompt": PROMPT, "new_tokens": new, "tokens_equal": tokens_equal}
  for name, t in times.items():
    prefill, full = statistics.median(t["prefill"]), statistics.median(t["full"])
    decode = full - prefill  # not positive when too few tokens are timed on a noisy machine
    result[name] = {
      "prefill_s": prefill,
      "decode_s": decode,
      "decode_tokens_per_s": batch * (new - 1) / decode if decode > 0 else float("nan"),
    }
  for name in ("ours", "ours_cuma"):
    result[f"{name}_over_hf_decode"] = (
      result[name]["decode_tokens_per_s"] / result["hf"]["decode_tokens_per_s"]
    )
  return result


def main():
  platforms.skip_absent_tpu()  # no libtpu start-up errors on a CPU machine
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch", type=int, default=8)
  args = parser.parse_args()
  result = measure(MODEL, args.batch, args.repeats)
  if result["tokens_equal"] != 1.0:
    raise SystemExit(f"ours and Hugging Face differ on {1 - result['tokens_equal']:.1%} of tokens")
  if args.json:
    print(json.dumps(result, indent=2))
  else:
    for name in ("ours", "ours_cuma", "hf"):
      r = result[name]
      print(
        f"{name:>10}: prefill {r['prefill_s'] * 1e3:8.1f} ms  decode {r['decode_s']:7.3f} s  "
        f"{r['decode_tokens_per_s']:8.1f} tokens/s"
      )
    print(
      f"decode ratio ours / HF: {result['ours_over_hf_decode']:.2f} (no adapters), "
      f"{result['ours_cuma_over_hf_decode']:.2f} (CuMA)"
    )


if __name__ == "__main__":
  main()
