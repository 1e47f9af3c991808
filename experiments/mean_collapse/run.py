"""The mean-collapse study: every method and ablation, several seeds, on the synthetic survey.

    python experiments/mean_collapse/run.py [--quick] [--seeds 0 1 2] [--out DIR]

Trains and evaluates, per seed, full fine-tuning, LoRA, HydraLoRA, MixLoRA, prefix tuning,
CuMA at two ranks and CuMA's four ablations, all on one prepared survey and one warmed-up tiny
backbone, with the same data, steps and optimiser (the `demo` preset's, with
``--steps`` steps); then writes to ``--out``:

- ``results.csv`` and ``results.md``: mean and standard deviation over seeds of accuracy,
  macro-F1, EMD, EMD AUC, sigma-inequity and profile diversity on the test split, accuracy
  and EMD on the zero-shot split, and the trainable percentage; plus the untrained model,
  the population-mean predictor and the optimum;
- ``figures/cultural_topology.png``: CuMA's expert usage per latent culture and layer;
- ``figures/routing_by_profile.png``: per-profile routing distributions in 2-D (PCA),
  coloured by each profile's most probable latent culture;
- ``figures/emd_curves.png``: per method, the fraction of test questions whose EMD is at most
  each threshold.

``--quick`` runs the `tiny` preset (20 steps, one seed) as a smoke test of the whole study
(CI runs it).
Runs resume: a finished run's workdir is restored and evaluated, not retrained.
``--report_only`` rewrites the tables and figures from ``OUT/results.json`` without training.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time

from cuma_jax import platforms  # JAX-free: XLA_FLAGS is set below, before JAX starts

if "--quick" in sys.argv:
  # Tiny programs: XLA:CPU's compile time, not run time, dominates; skip its costly passes.
  os.environ.setdefault("XLA_FLAGS", platforms.FAST_CPU_COMPILE_FLAGS)

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cuma_jax import analysis, figures, presets, runtime, schema, tasks  # noqa: E402
from cuma_jax.data.pipeline import SurveyTables  # noqa: E402
from cuma_jax.param_count import count_parameters  # noqa: E402
from cuma_jax.tasks import survey  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True)
class Run:
  label: str
  method: str
  ablation: str = "none"
  overrides: tuple[tuple[str, object], ...] = ()


RUNS = (
  Run("full fine-tuning", "full"),
  Run("LoRA", "lora"),
  Run("HydraLoRA", "hydralora"),
  Run("MixLoRA", "mixlora"),
  Run("prefix tuning", "prefix"),
  Run("CuMA r=8", "cuma"),
  Run("CuMA r=32", "cuma", overrides=(("adapter.rank", 32), ("adapter.alpha", 64.0))),
  Run("CuMA w/o demographics", "cuma", "no_demographics"),
  Run("CuMA soft routing", "cuma", "soft_routing"),
  Run("CuMA w/o balance loss", "cuma", "no_balance_loss"),
  Run("CuMA minimal", "cuma", "minimal"),
)
# The run whose routing the figures show.
TOPOLOGY_RUN = "CuMA r=8"
# (results.csv column, split, metric key)
COLUMNS = (
  ("accuracy", "test", "accuracy"),
  ("macro_f1", "test", "macro_f1"),
  ("emd", "test", "emd_mean"),
  ("emd_auc", "test", "emd_auc"),
  ("emd_auc_released", "test", "emd_auc_released"),
  ("sigma_inequity", "test", "sigma_inequity"),
  ("profile_diversity", "test", "profile_diversity"),
  ("zero_shot_accuracy", "zero_shot", "accuracy"),
  ("zero_shot_emd", "zero_shot", "emd_mean"),
)
REFERENCES = (
  ("untrained", "model"),
  ("population-mean predictor", "population_mean"),
  ("Bayes-optimal predictor", "optimum"),
)


# The n-gram encoders this process fits: the runs on one prepared survey share one fit.
FITTED = runtime.FittedEncoders()


def slug(text: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def run_config(run: Run, preset: str, seed: int, steps: int, backbone: str, data_dir: str):
  """``run`` at ``preset`` scale, on the shared backbone and data, with ``seed``."""
  c = presets.experiment_config(run.method, preset, run.ablation)
  c.unlock()
  presets.apply_overrides(
    c,
    {
      "seed": seed,
      "data.shuffle_seed": seed,
      "model.checkpoint": backbone,
      "data.data_dir": data_dir,
      "train.num_steps": steps,
      "train.checkpoint_every": steps,
      "train.progress_bar": False,
      "eval.untrained": False,
      "eval.baselines": (),
      "eval.lora_baseline_rank": 0,
      "eval.baseline_learning_rates": (),
      **dict(run.overrides),
    },
  )
  return schema.validate(c)


def shared_inputs(preset: str, workdir: str, log, overrides: presets.Overrides | None = None):
  """The prepared survey and the warmed-up tiny backbone every run reads (``overrides``: of the
  data and the backbone's warm-up, as the runs will set them)."""
  config = schema.validate(presets.experiment_config("cuma", preset, overrides=overrides))
  data = survey.load_data(config, workdir, log)
  backbone = runtime.build_tiny_backbone(
    config, os.path.join(workdir, "assets"), data, survey.TASK, log
  )
  return config, data, backbone


def references(preset: str, workdir: str, backbone: str, data_dir: str, log) -> dict:
  """Untrained model (CuMA's adapters at initialisation add nothing), population-mean
  predictor and optimum, per split."""
  c = run_config(Run("untrained", "cuma"), preset, 0, 1, backbone, data_dir)
  experiment = survey.prepare(c, os.path.join(workdir, "untrained"), log, encoders=FITTED)
  return {split: experiment.evaluate(split) for split in c.eval.splits}


def linear_probe(config, data, backbone: str) -> dict[str, dict[str, float]]:
  """How much culture the profile vectors carry: a least-squares linear probe for each
  profile's most probable latent culture, fitted on training profiles and scored on held-out
  ones, for the fitted n-gram encoder and the tiny backbone's standardised pooled states."""
  encoders = {}
  for kind, overrides in (
    ("fitted n-grams (the demo's)", {"encoder.kind": "fitted_ngrams"}),
    (
      "tiny backbone, mean-pooled, standardised",
      {
        "encoder.kind": "decoder",
        "encoder.standardize": True,
        "adapter.demographic_dim": config.tiny_backbone.hidden_size,
      },
    ),
  ):
    c = presets.with_overrides(config, overrides)
    encoders[kind] = runtime.make_demographics(
      c, backbone, survey.TASK, data.sources["train"], encoders=FITTED
    )
  culture = lambda profiles: np.array(  # noqa: E731
    [np.argmax(data.oracle.culture_posterior[p]) for p in profiles]
  )
  train = SurveyTables.of(data.sources["train"]).profiles
  result = {}
  for kind, demographics in encoders.items():
    z = np.c_[demographics.encode(train), np.ones(len(train))]
    targets = np.eye(config.data.synthetic.num_cultures)[culture(train)]
    weights = np.linalg.lstsq(z, targets, rcond=None)[0]
    result[kind] = {}
    for split in config.eval.splits:
      profiles = SurveyTables.of(data.sources[split]).profiles
      held_out = np.c_[demographics.encode(profiles), np.ones(len(profiles))]
      result[kind][split] = float(((held_out @ weights).argmax(1) == culture(profiles)).mean())
  return result


def summarize(values: list[float]) -> tuple[float, float]:
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def write_tables(rows: list[dict], probe: dict, out: str, seeds, steps, preset, seconds) -> None:
  fields = ["method", "seeds", "trainable_percent"]
  for name, *_ in COLUMNS:
    fields += [name, f"{name}_std"]
  with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
  header = [
    "method",
    "trainable %",
    "accuracy",
    "macro-F1",
    "EMD ↓",
    "EMD AUC",
    "EMD AUC (released, %)",
    "σ-inequity ↓",
    "profile diversity",
    "zero-shot accuracy",
    "zero-shot EMD ↓",
  ]
  lines = [
    "# Mean collapse on the synthetic survey",
    "",
    f"`python experiments/mean_collapse/run.py{' --quick' if preset == 'tiny' else ''}`: "
    f"preset `{preset}`, {steps} training steps per run, seeds {list(seeds)}, "
    f"{seconds / 60:.1f} min wall time. Mean ± standard deviation over seeds; test split "
    "unless marked zero-shot (profile cells never seen in training).",
    "",
    "| " + " | ".join(header) + " |",
    "|" + "---|" * len(header),
  ]
  for row in rows:
    cells = [row["method"], fmt(row["trainable_percent"], None, 3)]
    for name, *_ in COLUMNS:
      digits = 1 if name == "emd_auc_released" else 2 if name == "profile_diversity" else 4
      cells.append(fmt(row[name], row[f"{name}_std"], digits))
    lines.append("| " + " | ".join(cells) + " |")
  splits = list(next(iter(probe.values())))
  lines += [
    "",
    "Culture in the profile vectors: accuracy of a linear probe for each held-out profile's "
    "most probable latent culture (least squares on the training profiles' vectors; the "
    "culture labels serve the probe only, never training). The oracle's own vectors score 1.",
    "",
    "| encoder | " + " | ".join(splits) + " |",
    "|---|" + "---|" * len(splits),
    *[
      f"| {kind} | " + " | ".join(f"{v[s]:.3f}" for s in splits) + " |" for kind, v in probe.items()
    ],
  ]
  lines += [
    "",
    "![cultural topology](figures/cultural_topology.png)",
    "",
    "![routing by profile](figures/routing_by_profile.png)",
    "",
    "![EMD curves](figures/emd_curves.png)",
    "",
  ]
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines))


def fmt(mean, std, digits: int) -> str:
  if mean == "" or mean is None:
    return "—"
  text = f"{mean:.{digits}f}"
  return text if std in (None, "", 0.0) else f"{text} ± {std:.{digits}f}"


def plot_topology(experiment, oracle, out: str) -> None:
  """CuMA's expert usage per latent culture and layer, and per-profile routing in 2-D."""
  usage = analysis.routing_usage(experiment, "test")
  culture = analysis.latent_culture(oracle)
  figure = figures.cultural_topology(
    analysis.usage_by_group(usage, culture),
    "CuMA expert usage per latent culture and layer (test profiles)",
  )
  _save(figure, out, "cultural_topology.png")
  figure = figures.routing_projection(usage, culture, "CuMA routing per test profile (PCA)")
  _save(figure, out, "routing_by_profile.png")


def _save(figure, out: str, name: str) -> None:
  figures.save(figure, os.path.join(out, "figures"), name)
  plt.close(figure)


def main(argv=None) -> int:
  platforms.skip_absent_tpu()  # no libtpu start-up errors on a CPU machine
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny preset, 20 steps, one seed")
  parser.add_argument("--seeds", type=int, nargs="+", default=None)
  parser.add_argument("--steps", type=int, default=None, help="training steps per run")
  parser.add_argument("--out", default=HERE, help="where results and figures are written")
  parser.add_argument("--workdir", default=None, help="run workdirs (default OUT/runs)")
  parser.add_argument(
    "--report_only",
    action="store_true",
    help="rewrite the tables and figures from OUT/results.json and the runs, training nothing",
  )
  args = parser.parse_args(argv)
  preset = "tiny" if args.quick else "demo"
  seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
  steps = args.steps or (20 if args.quick else 300)
  workdir = args.workdir or os.path.join(args.out, "runs")
  os.makedirs(os.path.join(args.out, "figures"), exist_ok=True)
  # Seeds after the first reuse the first's compiled programs.
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  start = time.time()

  def log(*message):
    print(f"[{time.time() - start:6.0f}s]", *message, flush=True)

  config, data, backbone = shared_inputs(preset, workdir, log)
  data_dir = config.data.data_dir or os.path.join(workdir, "tfds")
  if args.report_only:
    with open(os.path.join(args.out, "results.json")) as f:
      saved = json.load(f)
    reference, probe, results = saved["reference"], saved["probe"], saved["runs"]
    seconds = saved["seconds"]
    if set(results) != {run.label for run in RUNS} or any(
      len(r) != len(seeds) for r in results.values()
    ):
      raise ValueError(f"{args.out}/results.json holds other runs or seeds than {seeds}")
  else:
    reference = references(preset, workdir, backbone, data_dir, log)
    probe = linear_probe(config, data, backbone)
    log(f"linear probe for the latent culture: {probe}")
    results = {run.label: [] for run in RUNS}
    for seed in seeds:
      for run in RUNS:
        c = run_config(run, preset, seed, steps, backbone, data_dir)
        run_dir = run_workdir(workdir, run, seed)
        log(f"{run.label}, seed {seed}: {run_dir}")
        results[run.label].append(
          survey.run(c, run_dir, log=lambda *_: None, encoders=FITTED)["trained"]
        )
        m = results[run.label][-1]["test"]["model"]
        log(f"  test accuracy {m['accuracy']:.4f}  EMD {m['emd_mean']:.4f}")
    seconds = time.time() - start
    with open(os.path.join(args.out, "results.json"), "w") as f:
      json.dump(
        {"reference": reference, "probe": probe, "runs": results, "seconds": seconds}, f, indent=1
      )

  rows = []
  for label, key in REFERENCES:
    row = {"method": label, "seeds": 1, "trainable_percent": ""}
    for name, split, metric in COLUMNS:
      row[name], row[f"{name}_std"] = reference[split][key][metric], ""
    rows.append(row)
  for run in RUNS:
    c = run_config(run, preset, seeds[0], steps, backbone, data_dir)
    row = {
      "method": run.label,
      "seeds": len(seeds),
      "trainable_percent": count_parameters(c)["trainable_percent"],
    }
    for name, split, metric in COLUMNS:
      row[name], row[f"{name}_std"] = summarize(
        [r[split]["model"][metric] for r in results[run.label]]
      )
    rows.append(row)
  write_tables(rows, probe, args.out, seeds, steps, preset, seconds)
  curves = {
    label: list(reference["test"][key]["emd_by_question"].values()) for label, key in REFERENCES
  }
  for run in RUNS:
    curves[run.label] = [
      e for r in results[run.label] for e in r["test"]["model"]["emd_by_question"].values()
    ]
  _save(figures.emd_curves(curves, dashed=dict(REFERENCES)), args.out, "emd_curves.png")
  topology = next(run for run in RUNS if run.label == TOPOLOGY_RUN)
  experiment = tasks.restore(
    run_workdir(workdir, topology, seeds[0]), log=lambda *_: None, encoders=FITTED
  )
  plot_topology(experiment, data.oracle, args.out)
  log(f"wrote {args.out}/results.md, results.csv, results.json and figures/")
  return 0


def run_workdir(workdir: str, run: Run, seed: int) -> str:
  return os.path.join(workdir, f"{slug(run.label)}_seed{seed}")


if __name__ == "__main__":
  sys.exit(main())
