"""The demo's settings, chosen on the validation split (test is never read here).

    python experiments/demo/sweep.py [--out DIR] [--workdir DIR]

Trains each candidate of the `demo` preset (``configs/cuma.py:demo``) on the synthetic
survey's train split and scores it on `valid` (participants disjoint from train and test):

- each method's learning rate: CuMA, and the LoRA baseline at CuMA's trainable-parameter
  budget, both reading the profile in the system prompt;
- the backbone's warm-up: profile-blind (the survey without profiles) or profile-reading
  (mixed with questions about each profile's own fields), for both methods at their rates.

Writes ``sweep.md`` and ``sweep.json`` to ``--out``: one row per candidate with its valid
accuracy and EMD, the choice (best valid accuracy per method and warm-up, ties to the lower
EMD) and the wall time. Runs resume: a finished candidate's workdir is evaluated, not
retrained.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

import jax

from cuma_jax import job, presets
from cuma_jax.tiny import backbone as tiny_backbone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))
from step import matmul_rate  # noqa: E402

LEARNING_RATES = (1e-3, 3e-3, 1e-2)
METHODS = ("cuma", "lora")


@dataclasses.dataclass(frozen=True)
class Candidate:
  method: str
  learning_rate: float
  warmup: str

  @property
  def name(self) -> str:
    return f"{self.method}_lr{self.learning_rate:g}_{self.warmup}"


def candidate_config(candidate: Candidate, backbone: str, data_dir: str, steps: int | None):
  """The demo's config of ``candidate`` (the LoRA baseline exactly as the demo builds it),
  evaluated on ``valid`` only."""
  overrides = {
    "tiny_backbone.warmup": candidate.warmup,
    "model.checkpoint": backbone,
    "data.data_dir": data_dir,
    "eval.splits": ("valid",),
    "train.progress_bar": False,
  }
  if steps:
    overrides["train.num_steps"] = steps
  if candidate.method == "cuma":
    overrides["optim.learning_rate"] = candidate.learning_rate
    overrides["eval.baselines"] = ()
    overrides["eval.baseline_learning_rates"] = ()
    return presets.experiment_config("cuma", "demo", overrides=overrides)
  overrides["eval.baseline_learning_rates"] = ((candidate.method, candidate.learning_rate),)
  overrides["eval.baselines"] = (candidate.method,)
  run = presets.experiment_config("cuma", "demo", overrides=overrides)
  return presets.baseline_config(run, candidate.method, backbone=backbone, data_dir=data_dir)


def shared_inputs(workdir: str, warmup: str, log):
  """The prepared survey and the backbone warmed up by ``warmup``."""
  config = presets.experiment_config("cuma", "demo", overrides={"tiny_backbone.warmup": warmup})
  data = job.load_data(config, workdir, log)
  backbone = tiny_backbone.build_warmed_up(config, os.path.join(workdir, "assets"), data, log)
  return backbone, config.data.data_dir or os.path.join(workdir, "tfds")


def choose(rows: list[dict]) -> dict[tuple[str, str], dict]:
  """Per (method, warm-up): the row of best valid accuracy (ties: lower EMD)."""
  best = {}
  for row in rows:
    key = (row["method"], row["warmup"])
    if key not in best or (row["accuracy"], -row["emd"]) > (
      best[key]["accuracy"],
      -best[key]["emd"],
    ):
      best[key] = row
  return best


def write_report(rows, chosen, out: str, seconds: float, rate: float, steps: int) -> None:
  lines = [
    "# The demo's validation sweep",
    "",
    f"`python experiments/demo/sweep.py`, {datetime.date.today()}, on a 2-core CPU whose "
    f"2048x2048 fp32 matmul ran at {rate / 1e9:.0f} GFLOP/s (median of 10); "
    f"{seconds / 60:.1f} min wall time. Preset `demo` ({steps} steps, seed 0), each candidate "
    "trained on `train` and scored on `valid` (250 participants disjoint from train and test). "
    "Test was not read.",
    "",
    "| method | learning rate | backbone warm-up | valid accuracy | valid EMD ↓ | chosen |",
    "|---|---|---|---|---|---|",
  ]
  picked = {id(r) for r in chosen.values()}
  for row in rows:
    lines.append(
      f"| {row['method']} | {row['learning_rate']:g} | {row['warmup']} | "
      f"{row['accuracy']:.4f} | {row['emd']:.4f} | {'✓' if id(row) in picked else ''} |"
    )
  lines.append("")
  with open(os.path.join(out, "sweep.md"), "w") as f:
    f.write("\n".join(lines))
  with open(os.path.join(out, "sweep.json"), "w") as f:
    json.dump({"rows": rows, "seconds": seconds, "matmul_gflops": rate / 1e9}, f, indent=1)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=HERE)
  parser.add_argument("--workdir", default=None, help="run workdirs (default OUT/runs)")
  parser.add_argument("--steps", type=int, default=None, help="training steps (preset's)")
  parser.add_argument("--learning_rates", type=float, nargs="+", default=LEARNING_RATES)
  args = parser.parse_args(argv)
  workdir = args.workdir or os.path.join(args.out, "runs")
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  rate = matmul_rate()
  start = time.time()

  def log(*message):
    print(f"[{time.time() - start:6.0f}s]", *message, flush=True)

  def score(candidate: Candidate, backbone: str, data_dir: str) -> dict:
    config = candidate_config(candidate, backbone, data_dir, args.steps)
    log(candidate.name)
    metrics = job.run(config, os.path.join(workdir, candidate.name), log=lambda *_: None)
    m = metrics["trained"]["valid"]["model"]
    log(f"  valid accuracy {m['accuracy']:.4f}  EMD {m['emd_mean']:.4f}")
    return {**dataclasses.asdict(candidate), "accuracy": m["accuracy"], "emd": m["emd_mean"]}

  # The demo's profile-reading backbone: every rate of every method.
  inputs = shared_inputs(workdir, "profile_reading", log)
  rows = [
    score(Candidate(method, lr, "profile_reading"), *inputs)
    for method in METHODS
    for lr in args.learning_rates
  ]
  # The profile-blind backbone, each method at the rate it was chosen at.
  rates = {method: row["learning_rate"] for (method, _), row in choose(rows).items()}
  inputs = shared_inputs(workdir, "profile_blind", log)
  rows += [score(Candidate(method, rates[method], "profile_blind"), *inputs) for method in METHODS]
  seconds = time.time() - start
  steps = args.steps or presets.experiment_config("cuma", "demo").train.num_steps
  write_report(rows, choose(rows), args.out, seconds, rate, steps)
  log(f"wrote {args.out}/sweep.md and sweep.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
