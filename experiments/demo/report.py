"""The demo's results page, from a finished run of the README's main command.

    python -m cuma_jax.main --config=configs/cuma.py:demo --workdir=runs/demo
    python experiments/demo/report.py --workdir=runs/demo --seconds=SECONDS

Writes ``results.md`` beside this file: the test and zero-shot metrics of CuMA, of each
baseline the run trained, and of the survey's reference predictors; each model's trainable
parameters; the command, the date, the wall time and this machine's matmul rate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

from cuma_jax import schema
from cuma_jax.param_count import count_parameters

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))
from step import matmul_rate  # noqa: E402

LABELS = {"cuma": "CuMA", "lora": "LoRA", "full": "full fine-tuning"}
REFERENCES = (
  ("population_mean", "population-mean predictor (mean collapse)"),
  ("optimum", "Bayes-optimal predictor"),
)
HEADER = (
  "| method | reads the profile | trainable parameters | test accuracy | test EMD ↓ "
  "| zero-shot accuracy | zero-shot EMD ↓ |"
)


def _reads(config: dict) -> str:
  text = config["data"]["demographic_system_prompt"]
  adapter = schema.adapter_config(schema.from_dict(config))
  routed = adapter is not None and adapter.uses_demographics
  return " and ".join(w for w, on in (("as text", text), ("as z", routed)) if on) or "no"


def table(run_dirs: list[str]) -> list[str]:
  """The headline table: each finished run's test and zero-shot metrics (its own
  ``results.json``), then the survey's reference predictors (the first run's)."""
  rows, references = [HEADER, "|---|---|---|---|---|---|---|"], None
  for run_dir in run_dirs:
    with open(os.path.join(run_dir, "results.json")) as f:
      results = json.load(f)
    config = results["run"]["config"]
    count = count_parameters(schema.from_dict(config))["trainable"]
    label = LABELS.get(config["method"], config["method"])
    if config["adapter"]["targets"] and config["method"] != "full":
      label += f" r={config['adapter']['rank']}"
    cells = [label, _reads(config), f"{count:,}"]
    for split in ("test", "zero_shot"):
      m = results["trained"][split]["model"]
      cells += [f"{m['accuracy']:.4f}", f"{m['emd_mean']:.4f}"]
    rows.append("| " + " | ".join(cells) + " |")
    references = references or results["trained"]
  for key, label in REFERENCES:
    cells = [label, "—", "—"]
    for split in ("test", "zero_shot"):
      m = references[split][key]
      cells += [f"{m['accuracy']:.4f}", f"{m['emd_mean']:.4f}"]
    rows.append("| " + " | ".join(cells) + " |")
  return rows


def demo_runs(workdir: str) -> list[str]:
  """A demo workdir's run, then each of its baselines' workdirs."""
  baselines = os.path.join(workdir, "baselines")
  names = sorted(os.listdir(baselines)) if os.path.isdir(baselines) else []
  return [workdir, *(os.path.join(baselines, name) for name in names)]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="the finished demo run")
  parser.add_argument("--seconds", type=float, required=True, help="the run's wall time")
  parser.add_argument("--out", default=os.path.join(HERE, "results.md"))
  args = parser.parse_args(argv)
  lines = [
    "# The demo (`configs/cuma.py:demo`)",
    "",
    "`python -m cuma_jax.main --config=configs/cuma.py:demo --workdir=runs/demo`, "
    f"{datetime.date.today()}, {args.seconds / 60:.1f} min wall time on a 2-core CPU whose "
    f"2048x2048 fp32 matmul ran at {matmul_rate() / 1e9:.0f} GFLOP/s (median of 10). "
    "Test and zero-shot splits, read once, with the settings chosen on the validation split "
    "([sweep.md](sweep.md)).",
    "",
    *table(demo_runs(args.workdir)),
    "",
  ]
  with open(args.out, "w") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
