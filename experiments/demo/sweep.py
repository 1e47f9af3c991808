"""The demo's settings, chosen on the validation split (test is never read here).

    python experiments/demo/sweep.py [--out DIR] [--workdir DIR]

Trains each candidate of the `demo` preset (``configs/cuma.py:demo``) on the synthetic
survey's train split and scores it on `valid` (participants disjoint from train and test):

- each method's learning rate: CuMA, and the LoRA baseline at CuMA's trainable-parameter
  budget, both reading the profile in the system prompt;
- CuMA's profile-encoder width (``adapter.demographic_dim``, which sizes the router's input
  and so CuMA's trainable parameters) at its chosen rate;
- the backbone's warm-up: profile-blind (the survey without profiles) or profile-reading
  (mixed with questions about each profile's own fields), for both methods at their settings.

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
import numpy as np

from cuma_jax import presets, runtime, schema
from cuma_jax.data import profile_questions, prompts
from cuma_jax.data.tokenize import ChatEncoder
from cuma_jax.evaluation import predict
from cuma_jax.evaluation.survey import sharded_choice
from cuma_jax.models.pretrained import load_pretrained, load_tokenizer
from cuma_jax.param_count import count_parameters
from cuma_jax.sharding import Layout
from cuma_jax.tasks import survey

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))
from step import matmul_rate  # noqa: E402

sys.path.insert(0, HERE)
import report  # noqa: E402

LEARNING_RATES = (1e-3, 3e-3, 1e-2)
METHODS = ("lora", "cuma")  # the baseline first: its rate matters most to fairness
# The preset's profile-encoder width, and the others tried for CuMA.
DEMOGRAPHIC_DIM = presets.experiment_config("cuma", "demo").adapter.demographic_dim
DEMOGRAPHIC_DIMS = (32, 64, 96)


@dataclasses.dataclass(frozen=True)
class Candidate:
  method: str
  learning_rate: float
  warmup: str
  demographic_dim: int = DEMOGRAPHIC_DIM

  @property
  def name(self) -> str:
    width = "" if self.demographic_dim == DEMOGRAPHIC_DIM else f"_d{self.demographic_dim}"
    return f"{self.method}_lr{self.learning_rate:g}_{self.warmup}{width}"


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
    overrides["adapter.demographic_dim"] = candidate.demographic_dim
    overrides["eval.baselines"] = ()
    overrides["eval.baseline_learning_rates"] = ()
    return schema.validate(presets.experiment_config("cuma", "demo", overrides=overrides))
  overrides["eval.baseline_learning_rates"] = ((candidate.method, candidate.learning_rate),)
  overrides["eval.baselines"] = (candidate.method,)
  run = schema.validate(presets.experiment_config("cuma", "demo", overrides=overrides))
  return presets.baseline_config(run, candidate.method, backbone=backbone, data_dir=data_dir)


def shared_inputs(workdir: str, warmup: str, log):
  """The demo's config with ``warmup``, its prepared survey and its warmed-up backbone."""
  config = schema.validate(
    presets.experiment_config("cuma", "demo", overrides={"tiny_backbone.warmup": warmup})
  )
  data = survey.load_data(config, workdir, log)
  backbone = runtime.build_tiny_backbone(
    config, os.path.join(workdir, "assets"), data, survey.TASK, log
  )
  return config, data, backbone


def profile_reading_accuracy(backbone: str, source, config, batch: int = 128):
  """How well a warmed-up backbone reads profiles it never trained on: its accuracy on the
  questions about each field of ``source``'s profiles, and that of guessing."""
  module, params = load_pretrained(backbone)
  tokenizer = load_tokenizer(backbone)
  records = source.__getitems__(range(len(source)))
  questions = profile_questions.ProfileQuestions(profile_questions.profile_fields(records))
  encoder = ChatEncoder(tokenizer, config.data.max_length)
  letters = tuple(predict.letter_token_ids(tokenizer, prompts.LETTERS))
  choose, _ = sharded_choice(module, Layout.of(config.mesh), letters)
  correct = []
  for start in range(0, len(questions), batch):
    rows = [questions[i] for i in range(start, min(start + batch, len(questions)))]
    rows += rows[-1:] * (batch - len(rows))  # a fixed shape: one compilation
    encoded = [encoder(prompts.chat_messages(q.system, q.user), q.answer) for q in rows]
    inputs = {k: np.stack([e[k] for e in encoded]) for k in ("input_ids", "attention_mask")}
    inputs["prompt_length"] = np.array([e["prompt_length"] for e in encoded])
    inputs["profile_index"] = np.zeros(batch, np.int32)
    inputs["option_count"] = np.array([q.num_choices for q in rows])
    chosen, nonfinite = (np.asarray(x) for x in choose(params, None, inputs))
    if nonfinite.any():
      raise ValueError(f"the backbone {backbone} gives non-finite logits to profile questions")
    truth = np.array([prompts.LETTERS.index(q.answer) for q in rows])
    correct += list(chosen == truth)[: len(questions) - start]
  chance = np.mean([1 / questions[i].num_choices for i in range(len(questions))])
  return float(np.mean(correct)), float(chance)


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


def chosen_candidate(rows: list[dict], method: str) -> Candidate:
  """``method``'s chosen settings on the profile-reading backbone (the demo's)."""
  row = choose(rows)[(method, "profile_reading")]
  return Candidate(**{f.name: row.get(f.name, f.default) for f in dataclasses.fields(Candidate)})


def write_report(rows, chosen, reading, out: str, seconds, rate: float, steps: int) -> None:
  lines = [
    "# The demo's validation sweep",
    "",
    f"`python experiments/demo/sweep.py`, {datetime.date.today()}, on a 2-core CPU whose "
    f"2048x2048 fp32 matmul ran at {rate / 1e9:.0f} GFLOP/s (median of 10); "
    f"{seconds / 60:.1f} min wall time (of this invocation: a candidate trained by an earlier "
    f"one is evaluated, not retrained). Preset `demo` ({steps} steps, seed 0), each candidate "
    "trained on `train` and scored on `valid` (250 participants disjoint from train and test). "
    "Test was not read.",
    "",
    "| method | learning rate | encoder width | trainable parameters | backbone warm-up | "
    "valid accuracy | valid EMD ↓ | chosen |",
    "|---|---|---|---|---|---|---|---|",
  ]
  picked = {id(r) for r in chosen.values()}
  for row in rows:
    lines.append(
      f"| {row['method']} | {row['learning_rate']:g} | "
      f"{row.get('demographic_dim', DEMOGRAPHIC_DIM) if row['method'] == 'cuma' else ''} | "
      f"{row.get('trainable', ''):,} | {row['warmup']} | "
      f"{row['accuracy']:.4f} | {row['emd']:.4f} | {'✓' if id(row) in picked else ''} |"
    )
  lines += [
    "",
    "How well each warmed-up backbone reads a profile it never trained on: its accuracy on "
    "questions about each field of the valid profiles (cuma_jax.data.profile_questions).",
    "",
    "| backbone warm-up | profile-question accuracy (valid profiles) | guessing |",
    "|---|---|---|",
    *[f"| {w} | {acc:.3f} | {chance:.3f} |" for w, (acc, chance) in reading.items()],
    "",
  ]
  with open(os.path.join(out, "sweep.md"), "w") as f:
    f.write("\n".join(lines))
  with open(os.path.join(out, "sweep.json"), "w") as f:
    json.dump(
      {"rows": rows, "reading": reading, "seconds": seconds, "matmul_gflops": rate / 1e9},
      f,
      indent=1,
    )


def read_test(chosen: dict[str, list[Candidate]], workdir: str, data_dir: str, rate, log):
  """Evaluates the chosen candidates' runs on test and zero-shot, once, and writes
  ``results.md``: one table per backbone warm-up; the profile-reading one is the demo
  preset's training, as its command trains it."""
  tables = []
  for warmup, candidates in chosen.items():
    _, _, backbone = shared_inputs(workdir, warmup, log)
    run_dirs = []
    for candidate in candidates:
      c = presets.with_overrides(
        candidate_config(candidate, backbone, data_dir, None),
        {"mode": "eval", "eval.splits": ("test", "zero_shot")},
      )
      run_dirs.append(os.path.join(workdir, candidate.name))
      survey.run(c, run_dirs[-1], log=lambda *_: None)
    tables += [
      "",
      f"Backbone warm-up `{warmup}`"
      + (" (the demo's)" if warmup == "profile_reading" else "")
      + ":",
      "",
      *report.table(run_dirs),
    ]
  lines = [
    "# The demo (`configs/cuma.py:demo`)",
    "",
    f"{datetime.date.today()}, on a 2-core CPU whose 2048x2048 fp32 matmul ran at "
    f"{rate / 1e9:.0f} GFLOP/s (median of 10; a loaded machine). The runs of the settings "
    "chosen on the validation split ([sweep.md](sweep.md)), evaluated once on the test and "
    "zero-shot splits (`python experiments/demo/sweep.py --read_test`). Those on the "
    "profile-reading backbone are the `demo` preset's training (same backbone, data, seed and "
    "settings), which `python -m cuma_jax.main --config=configs/cuma.py:demo --workdir=runs/demo` "
    "runs; the profile-blind backbone is the other warm-up, at the same rates.",
    *tables,
    "",
  ]
  with open(os.path.join(HERE, "results.md"), "w") as f:
    f.write("\n".join(lines))
  log("\n".join(lines))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=HERE)
  parser.add_argument("--workdir", default=None, help="run workdirs (default OUT/runs)")
  parser.add_argument("--steps", type=int, default=None, help="training steps (preset's)")
  parser.add_argument("--learning_rates", type=float, nargs="+", default=LEARNING_RATES)
  parser.add_argument(
    "--demographic_dims",
    type=int,
    nargs="+",
    default=DEMOGRAPHIC_DIMS,
    help="CuMA's profile-encoder widths, tried at its chosen rate on the profile-reading backbone",
  )
  parser.add_argument(
    "--warmups",
    nargs="+",
    choices=("profile_reading", "profile_blind"),
    default=("profile_reading", "profile_blind"),
    help="the backbones, in this order (profile_blind reuses profile_reading's chosen rates)",
  )
  parser.add_argument(
    "--read_test",
    action="store_true",
    help="then evaluate the chosen profile-reading runs on test once and write results.md",
  )
  args = parser.parse_args(argv)
  if args.warmups[0] != "profile_reading":
    parser.error("--warmups starts with profile_reading: profile_blind takes its chosen rates")
  workdir = args.workdir or os.path.join(args.out, "runs")
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  rate = matmul_rate()
  start = time.time()

  def log(*message):
    print(f"[{time.time() - start:6.0f}s]", *message, flush=True)

  def score(candidate: Candidate, backbone: str, data_dir: str) -> dict:
    config = candidate_config(candidate, backbone, data_dir, args.steps)
    log(candidate.name)
    metrics = survey.run(config, os.path.join(workdir, candidate.name), log=lambda *_: None)
    m = metrics["trained"]["valid"]["model"]
    log(f"  valid accuracy {m['accuracy']:.4f}  EMD {m['emd_mean']:.4f}")
    return {
      **dataclasses.asdict(candidate),
      "trainable": count_parameters(config)["trainable"],
      "accuracy": m["accuracy"],
      "emd": m["emd_mean"],
    }

  rows, reading = [], {}

  def evaluate(candidate: Candidate, backbone: str, data_dir: str) -> None:
    rows.append(score(candidate, backbone, data_dir))
    # Rewritten after each candidate: an interrupted sweep still shows what it measured.
    write_report(rows, choose(rows), reading, args.out, time.time() - start, rate, steps)

  steps = args.steps or presets.experiment_config("cuma", "demo").train.num_steps
  # The demo's profile-reading backbone: every rate of every method; then the profile-blind
  # backbone, each method at the rate it was chosen at.
  for warmup in args.warmups:
    config, data, backbone = shared_inputs(workdir, warmup, log)
    data_dir = config.data.data_dir or os.path.join(workdir, "tfds")
    reading[warmup] = profile_reading_accuracy(backbone, data.sources["valid"], config)
    log(f"{warmup} backbone: profile questions on valid profiles {reading[warmup]}")
    if warmup == "profile_reading":
      candidates = [Candidate(m, lr, warmup) for m in METHODS for lr in args.learning_rates]
    else:
      candidates = [dataclasses.replace(chosen_candidate(rows, m), warmup=warmup) for m in METHODS]
    for candidate in candidates:
      evaluate(candidate, backbone, data_dir)
    if warmup == "profile_reading":
      # The encoder width at CuMA's chosen rate (that rate's preset-width run is done).
      best = chosen_candidate(rows, "cuma")
      for dim in args.demographic_dims:
        if dim != best.demographic_dim:
          evaluate(dataclasses.replace(best, demographic_dim=dim), backbone, data_dir)
  log(f"wrote {args.out}/sweep.md and sweep.json")
  if args.read_test:
    chosen = {
      warmup: [
        dataclasses.replace(chosen_candidate(rows, m), warmup=warmup) for m in ("cuma", "lora")
      ]
      for warmup in args.warmups
    }
    read_test(chosen, workdir, data_dir, rate, log)
  return 0


if __name__ == "__main__":
  sys.exit(main())
