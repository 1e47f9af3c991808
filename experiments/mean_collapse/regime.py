"""Where sparsity matters: each method's gap to the Bayes optimum as the cultures conflict more.

    python experiments/mean_collapse/regime.py [--quick] [--seeds 0 1 2] [--steps N]
        [--warmup profile_reading] [--out DIR] [--workdir DIR] [--select] [--report_only]

The synthetic survey is drawn at several degrees of conflict between its latent cultures:
``data.synthetic.num_cultures`` of 2, 4, 8 and 16, and at 4 cultures a consensus fraction
(questions every culture answers alike) of 0.5 instead of 0.15 and an answer width of 1.0
instead of 0.3 (cultures whose answers overlap). Each condition has its own prepared survey
and tiny backbone, warmed up as ``--warmup`` says (``tiny_backbone.warmup``). On each, four
methods train with the same data, steps and optimiser, every one given the profile as text
in the system prompt (``data.demographic_system_prompt``, at a length that cuts no prompt
token):

- LoRA + profile, its rank matched to CuMA's trainable-parameter count (alpha = 2 x rank);
- full fine-tuning + profile;
- a dense z-conditioned mixture: CuMA's routers and experts with soft gates over every
  expert (``adapter.gate=top_probs``, ``adapter.top_k=num_experts``), as many parameters as
  CuMA by construction;
- CuMA top-2 (the demo's CuMA; it reads z and the profile text).

The metric is each method's gap to the survey's Bayes-optimal predictor on the test split:
the optimum's accuracy minus the method's, and the method's EMD minus the optimum's; mean and
standard deviation over seeds. Writes to ``--out``: ``regime.md``, ``regime.csv``,
``regime.json`` and ``figures/regime_map.png`` (the gaps against the number of cultures).

``--select`` is the preliminary check that chose the learning rates (``LEARNING_RATES``): at
4 cultures, seed 0, each method at each rate of ``SELECTION_GRID``, scored on the ``valid``
split only; it writes ``regime_selection.json`` and the sweep's page shows its table.
``--quick`` runs the `tiny` preset (a few steps, one seed, 2 and 4 cultures) as a smoke test
(CI runs it). Runs resume: a finished run's results are read back, not retrained.
``--report_only`` rewrites the page and figure from ``OUT/regime.json`` (written after every
run, so also while a sweep runs or after it was stopped).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import itertools
import json
import os
import sys
import time

# isort: off
# The study's helpers; imported first, so that its XLA flags for --quick precede JAX.
import run as study
# isort: on

import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cuma_jax import figures, platforms, presets, schema  # noqa: E402
from cuma_jax.param_count import count_parameters  # noqa: E402
from cuma_jax.tasks import survey  # noqa: E402
from cuma_jax.training import checkpointing  # noqa: E402

sys.path.insert(0, os.path.join(study.HERE, os.pardir, "bench"))
from step import matmul_rate  # noqa: E402

# The longest synthetic example with its profile has ~172 tokens.
MAX_LENGTH = 176


@dataclasses.dataclass(frozen=True)
class Condition:
  """One survey: ``num_cultures`` latent cultures, and the other synthetic keys it changes."""

  num_cultures: int
  consensus_fraction: float = 0.15  # the synthetic survey's default
  answer_width: float = 0.3  # the demo's

  @property
  def name(self) -> str:
    return f"K{self.num_cultures}_consensus{self.consensus_fraction}_width{self.answer_width}"

  def overrides(self) -> presets.Overrides:
    return {
      f"data.synthetic.{field.name}": getattr(self, field.name)
      for field in dataclasses.fields(self)
    }


BASE = Condition(4)
CULTURE_COUNTS = (2, 4, 8, 16)
# Run group by group, seed by seed: the number of cultures first (the figure), then the other
# two axes, so that an interrupted sweep has covered the figure's conditions first.
CONDITION_GROUPS = (
  tuple(dataclasses.replace(BASE, num_cultures=k) for k in CULTURE_COUNTS),
  (dataclasses.replace(BASE, consensus_fraction=0.5), dataclasses.replace(BASE, answer_width=1.0)),
)
QUICK_GROUPS = ((Condition(2), Condition(4)),)

LORA, FULL, SOFT, TOP_K = (
  "LoRA + profile",
  "full fine-tuning + profile",
  "soft mixture (all experts)",
  "CuMA top-2",
)
METHODS = (LORA, FULL, SOFT, TOP_K)
# Chosen by --select on the valid split at 4 cultures (regime_selection.json; regime.md).
LEARNING_RATES = {LORA: 3e-3, FULL: 3e-3, SOFT: 1e-2, TOP_K: 1e-2}
SELECTION_GRID = {
  LORA: (1e-3, 3e-3, 1e-2),
  FULL: (3e-4, 1e-3, 3e-3),
  SOFT: (1e-3, 3e-3, 1e-2),
  TOP_K: (1e-3, 3e-3, 1e-2),
}
SELECTION_FILE = "regime_selection.json"
# The reference drawn dashed in the figure: the mean-collapsed prediction.
POPULATION_MEAN = "population-mean predictor"
# (regime.csv column, metric key); the gaps are computed from these and the optimum's.
METRICS = (("accuracy", "accuracy"), ("emd", "emd_mean"), ("diversity", "profile_diversity"))


@dataclasses.dataclass(frozen=True)
class Scale:
  """The sweep's size: the preset, the steps, and the keys it sets on the preset (the
  synthetic survey's splits, the batch, the tiny backbone's warm-up)."""

  preset: str
  steps: int
  overrides: dict

  def data_overrides(self, condition: Condition, warmup: str) -> presets.Overrides:
    """The survey of ``condition``, with the profile as text, and the backbone's warm-up."""
    return {
      **condition.overrides(),
      **self.overrides,
      "data.demographic_system_prompt": True,
      "data.max_length": MAX_LENGTH,
      "eval.splits": ("valid", "test"),
      # The preset's own comparison baselines are off: the sweep trains each method itself.
      "eval.baselines": (),
      "eval.baseline_learning_rates": (),
      "eval.lora_baseline_rank": 0,
      "tiny_backbone.warmup": warmup,
    }


# Sized for this 2-core machine (regime.md): the warm-up's loss levels off by step ~80; a
# batch of 16 gives twice the updates of the demo's 32 for the same compute.
FULL_SCALE = Scale(
  "demo",
  300,
  {
    "data.batch_size": 16,
    "data.synthetic.num_train": 1000,
    "data.synthetic.num_valid": 100,
    "data.synthetic.num_test": 100,
    "data.synthetic.num_zero_shot": 0,
    "tiny_backbone.warmup_steps": 150,
    # One vocabulary width for every survey's tokenizer, so that the conditions share
    # compiled programs.
    "tiny_backbone.vocab_multiple": 64,
  },
)
QUICK_SCALE = Scale("tiny", 4, {"tiny_backbone.vocab_multiple": 64})


def method_overrides(method: str, preset: str, base: presets.Overrides) -> tuple[str, dict]:
  """(the method's name in presets.METHODS, the overrides that make it ``method``)."""
  if method == TOP_K:
    return "cuma", {}
  if method == SOFT:
    experts = presets.experiment_config("cuma", preset, overrides=base).adapter.num_experts
    return "cuma", {"adapter.gate": "top_probs", "adapter.top_k": experts}
  if method == FULL:
    return "full", {}
  rank = matched_lora_rank(preset, base)
  return "lora", {"adapter.rank": rank, "adapter.alpha": 2.0 * rank}


def matched_lora_rank(preset: str, base: presets.Overrides) -> int:
  """LoRA's rank whose trainable-parameter count is nearest CuMA's (linear in the rank)."""
  cuma = count_parameters(presets.experiment_config("cuma", preset, overrides=base))
  per_rank = count_parameters(
    presets.experiment_config("lora", preset, overrides={**base, "adapter.rank": 1})
  )
  return max(1, round(cuma["trainable"] / per_rank["trainable"]))


def run_of(method: str, scale: Scale, base: presets.Overrides, learning_rate: float, splits):
  """``method`` at ``learning_rate``, evaluated on ``splits``; its label (and workdir) names
  the rate."""
  name, overrides = method_overrides(method, scale.preset, base)
  return study.Run(
    f"{method} lr={learning_rate:g}",
    name,
    overrides=tuple(
      {
        **base,
        **overrides,
        "optim.learning_rate": learning_rate,
        "eval.splits": splits,
      }.items()
    ),
  )


def train_and_evaluate(run: study.Run, scale: Scale, seed: int, inputs, workdir: str, log):
  """The run's metrics per split. A finished run's saved results are read back (or, for
  other splits, its trained model evaluated); a workdir trained with other settings is
  refused. So is a run whose training data pipeline cut prompt tokens."""
  config, _, backbone = inputs
  data_dir = config.data.data_dir or os.path.join(workdir, "tfds")
  c = study.run_config(run, scale.preset, seed, scale.steps, backbone, data_dir)
  run_dir = study.run_workdir(workdir, run, seed)
  saved = _read_json(os.path.join(run_dir, "results.json"))
  if saved:
    wanted = checkpointing.config_to_json(c)
    # Completed with the schema's defaults: keys added since the run was trained take them.
    trained = json.loads(json.dumps(schema.as_dict(schema.from_dict(saved["run"]["config"]))))
    if wanted == trained:
      log(f"{run.label}, seed {seed}: finished in {run_dir}")
      return {**_summary(saved["trained"], _truncated_tokens(run_dir)), "read_back": True}
    if {**wanted, "eval": None} != {**trained, "eval": None}:
      raise ValueError(
        f"{run_dir} holds a run trained with other settings than {run.label}'s at seed "
        f"{seed}; pass another --workdir"
      )
  log(f"{run.label}, seed {seed}: {run_dir}")
  results = survey.run(c, run_dir, log=lambda *_: None, encoders=study.FITTED)["trained"]
  truncated = _truncated_tokens(run_dir)
  if truncated:
    raise ValueError(
      f"{run_dir}: the data pipeline cut {truncated} prompt tokens at data.max_length="
      f"{c.data.max_length}; raise MAX_LENGTH so that every profile fits"
    )
  return _summary(results, truncated)


def _truncated_tokens(run_dir: str) -> int:
  records = figures.read_metrics(os.path.join(run_dir, "train", "metrics.jsonl"))
  return int(sum(r.get("truncated_tokens", 0) for r in records))


def _summary(results: dict, truncated: int) -> dict:
  """Per split, the model's and the optimum's metrics this study reads."""
  return {
    "truncated_tokens": truncated,
    **{
      split: {
        predictor: {key: by[predictor][key] for _, key in METRICS}
        for predictor in ("model", "optimum", "population_mean")
      }
      for split, by in results.items()
    },
  }


def condition_inputs(condition: Condition, scale: Scale, warmup: str, workdir: str, log):
  base = scale.data_overrides(condition, warmup)
  condition_dir = os.path.join(workdir, condition.name)
  return base, condition_dir, study.shared_inputs(scale.preset, condition_dir, log, base)


def select(scale: Scale, seed: int, warmup: str, workdir: str, log) -> dict:
  """Valid-split metrics of each method at each rate of SELECTION_GRID, at 4 cultures."""
  base, condition_dir, inputs = condition_inputs(BASE, scale, warmup, workdir, log)
  chosen, table = {}, {}
  for method in METHODS:
    table[method] = {}
    for rate in SELECTION_GRID[method]:
      run = run_of(method, scale, base, rate, ("valid",))
      result = train_and_evaluate(run, scale, seed, inputs, condition_dir, log)
      table[method][f"{rate:g}"] = result["valid"]
      log(f"  valid accuracy {result['valid']['model']['accuracy']:.4f}")
    chosen[method] = max(table[method], key=lambda r: table[method][r]["model"]["accuracy"])
  return {
    "condition": BASE.name,
    "seed": seed,
    "steps": scale.steps,
    "batch_size": inputs[0].data.batch_size,
    "valid": table,
    "chosen": chosen,
  }


def sweep(scale: Scale, groups, seeds, warmup: str, workdir: str, log, save) -> dict:
  """Per condition: the methods' parameter counts and rates, and each seed's test metrics.
  Group by group, seed by seed (``save(result)`` after each run)."""
  result, inputs = {}, {}
  for group, seed in itertools.product(groups, seeds):
    for condition in group:
      if condition.name not in inputs:
        inputs[condition.name] = condition_inputs(condition, scale, warmup, workdir, log)
      base, condition_dir, shared = inputs[condition.name]
      entry = result.setdefault(
        condition.name, {"condition": dataclasses.asdict(condition), "methods": {}}
      )
      for method in METHODS:
        run = run_of(method, scale, base, LEARNING_RATES[method], ("test",))
        if method not in entry["methods"]:
          config = study.run_config(run, scale.preset, seed, scale.steps, shared[2], "")
          entry["methods"][method] = {
            "learning_rate": LEARNING_RATES[method],
            "rank": config.adapter.rank if run.method == "lora" else None,
            "trainable": count_parameters(config)["trainable"],
            "seeds": [],
          }
        metrics = train_and_evaluate(run, scale, seed, shared, condition_dir, log)
        entry["methods"][method]["seeds"].append(metrics)
        m = metrics["test"]["model"]
        log(f"  test accuracy {m['accuracy']:.4f}  EMD {m['emd_mean']:.4f}")
        save(result)
  return result


def gaps(entry: dict, method: str, predictor: str = "model") -> dict[str, tuple[float, float]]:
  """(mean, std over seeds) of the method's accuracy and EMD gaps to the optimum, and of its
  own accuracy, EMD and profile diversity (``predictor="population_mean"``: of the
  population-mean predictor, as recorded beside the method's runs)."""
  runs = entry["methods"][method]["seeds"]
  model = lambda key: [r["test"][predictor][key] for r in runs]  # noqa: E731
  optimum = lambda key: [r["test"]["optimum"][key] for r in runs]  # noqa: E731
  return {
    "accuracy_gap": study.summarize(list(np.subtract(optimum("accuracy"), model("accuracy")))),
    "emd_gap": study.summarize(list(np.subtract(model("emd_mean"), optimum("emd_mean")))),
    **{name: study.summarize(model(key)) for name, key in METRICS},
  }


def plot(result: dict, out: str) -> None:
  """The accuracy and EMD gaps against the number of cultures, one line per method."""
  by_cultures = sorted(
    (entry["condition"]["num_cultures"], entry)
    for entry in result.values()
    if _on_axis(entry["condition"], "num_cultures")
  )
  panels = {}
  for key, title in (
    ("accuracy_gap", "optimum's accuracy − method's (test)"),
    ("emd_gap", "method's EMD − optimum's (test)"),
  ):
    lines = {
      method: [(k, *gaps(e, method)[key]) for k, e in by_cultures if method in e["methods"]]
      for method in METHODS
    }
    lines[POPULATION_MEAN] = [
      (k, *gaps(e, next(iter(e["methods"])), "population_mean")[key]) for k, e in by_cultures
    ]
    panels[title] = {method: points for method, points in lines.items() if points}
  figure = figures.lines_with_errors(
    panels, xlabel="number of latent cultures", log_x=True, dashed=(POPULATION_MEAN,)
  )
  figures.save(figure, os.path.join(out, "figures"), "regime_map.png")
  plt.close(figure)


def _on_axis(condition: dict, axis: str) -> bool:
  """Whether a condition differs from BASE in ``axis`` alone (BASE lies on every axis)."""
  return all(
    condition[field.name] == getattr(BASE, field.name)
    for field in dataclasses.fields(Condition)
    if field.name != axis
  )


def write_report(saved: dict, out: str) -> None:
  rows = []
  for entry in saved["conditions"].values():
    for method, info in entry["methods"].items():
      stats, first = gaps(entry, method), info["seeds"][0]["test"]
      rows.append(
        {
          **entry["condition"],
          "method": method,
          "trainable": info["trainable"],
          "rank": info["rank"] or "",
          "learning_rate": info["learning_rate"],
          "seeds": len(info["seeds"]),
          **{name: v[0] for name, v in stats.items()},
          **{f"{name}_std": v[1] for name, v in stats.items()},
          "optimum_accuracy": first["optimum"]["accuracy"],
          "optimum_emd": first["optimum"]["emd_mean"],
          "population_mean_accuracy": first["population_mean"]["accuracy"],
          "population_mean_accuracy_gap": gaps(entry, method, "population_mean")["accuracy_gap"][0],
          "population_mean_emd_gap": gaps(entry, method, "population_mean")["emd_gap"][0],
          "truncated_tokens": sum(r["truncated_tokens"] for r in info["seeds"]),
        }
      )
  with open(os.path.join(out, "regime.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  with open(os.path.join(out, "regime.md"), "w") as f:
    f.write(_page(saved, rows))


def _page(saved: dict, rows: list[dict]) -> str:
  survey = saved["survey"]
  sizes = ", ".join(f"{survey[f'num_{split}']} {split}" for split in ("train", "valid", "test"))
  truncated = sum(row["truncated_tokens"] for row in rows)
  lines = [
    "# Where sparsity matters: the gap to the Bayes optimum as the cultures conflict",
    "",
    f"`{saved['command']}`: preset `{saved['preset']}` ({sizes} participants of "
    f"{survey['num_questions']} questions each), {saved['steps']} training steps per run "
    f"(batch {survey['batch_size']}), seeds {saved['seeds']}, "
    f"tiny backbone warmed up `{saved['warmup']}` for "
    f"{survey['warmup_steps']} steps. {_wall_time(saved)}",
    "",
  ]
  if not saved["complete"]:
    groups = QUICK_GROUPS if saved["preset"] == QUICK_SCALE.preset else CONDITION_GROUPS
    missing = [
      f"{c.num_cultures} cultures, consensus fraction {c.consensus_fraction:g}, answer width "
      f"{c.answer_width:g}"
      for group in groups
      for c in group
      if c.name not in saved["conditions"]
    ]
    lines += [
      "**Incomplete:** this page was written before the sweep finished; the tables show the "
      "runs that had (the `seeds` column counts them)."
      + (f" Not run at all: {'; '.join(missing)}." if missing else ""),
      "",
    ]
  lines += [
    "Every method sees the profile as text in its system prompt "
    f"(`data.max_length={MAX_LENGTH}`: the training logs count {truncated} truncated prompt "
    "tokens); CuMA and the soft mixture also read the profile vector z. Gaps: the "
    "Bayes-optimal predictor's test accuracy minus the method's, and the method's test EMD "
    "minus the optimum's (0 is the optimum; lower is better); mean ± standard deviation "
    "over seeds.",
    "",
    "| method | trainable parameters | LoRA rank | learning rate |",
    "|---|---|---|---|",
    *[
      f"| {row['method']} | {row['trainable']:,} | {row['rank']} | {row['learning_rate']:g} |"
      for row in {row["method"]: row for row in rows}.values()  # the same in every condition
    ],
    "",
  ]
  if saved.get("selection"):
    lines += [*_selection_table(saved["selection"], saved), ""]
  lines += ["## What it shows", "", *_findings(rows), ""]
  for axis, title in (
    ("num_cultures", "Number of latent cultures"),
    ("consensus_fraction", "Consensus fraction (at 4 cultures)"),
    ("answer_width", "Answer width (at 4 cultures)"),
  ):
    if len({row[axis] for row in rows if _on_axis(row, axis)}) > 1:
      lines += [f"## {title}", "", *_axis_table(rows, axis), ""]
  lines += ["![regime map](figures/regime_map.png)", ""]
  return "\n".join(lines)


def _invocations(saved: dict) -> list[dict]:
  """Each invocation that trained part of the sweep: its start, wall time, matmul rate and
  the runs it trained (a resumed sweep reads finished runs back instead of retraining)."""
  if "invocations" in saved:
    return saved["invocations"]
  runs = [
    s
    for c in saved.get("conditions", {}).values()
    for m in c["methods"].values()
    for s in m["seeds"]
  ]
  return [
    {
      "date": saved["date"],
      "seconds": saved["seconds"],
      "matmul_gflops": saved["matmul_gflops"],
      "trained": len(runs),
    }
  ]


def _wall_time(saved: dict) -> str:
  parts = [
    f"{i['seconds'] / 60:.1f} min from {i['date']} training {i['trained']} runs, the 2048x2048 "
    f"float32 `jnp` matmul at {i['matmul_gflops']:.0f} GFLOP/s (median of 10, at its start)"
    for i in _invocations(saved)
  ]
  total = sum(i["seconds"] for i in _invocations(saved)) / 60
  return (
    f"Wall time {total:.1f} min in all: " + "; ".join(parts) + ". The machine was shared with "
    "other jobs, so these are upper bounds of the sweep's cost on an idle 2-core machine."
    if len(parts) > 1
    else f"Wall time {parts[0]}."
  )


def _selection_table(selection: dict, saved: dict) -> list[str]:
  """The learning-rate check on valid, each method's chosen rate in bold."""
  check = (selection["steps"], selection["batch_size"])
  sweep = (saved["steps"], saved["survey"]["batch_size"])
  lines = [
    f"Learning rates, chosen on the `valid` split (never test) by `{selection['command']}`: "
    f"at 4 cultures, seed {selection['seed']}, {selection['steps']} steps of batch "
    f"{selection['batch_size']}, backbone warmed up `{selection['warmup']}`; each method takes "
    "the rate of its best valid accuracy (in bold)."
    + (
      f" The sweep runs {sweep[0]} steps of batch {sweep[1]} ({sweep[0] * sweep[1]:,} "
      f"examples per run, against the check's {check[0] * check[1]:,})."
      if check != sweep
      else ""
    ),
    "",
    "| method | learning rate | valid accuracy | valid EMD |",
    "|---|---|---|---|",
  ]
  for method, by_rate in selection["valid"].items():
    for rate, metrics in by_rate.items():
      mark = "**" if rate == selection["chosen"][method] else ""
      lines.append(
        f"| {method} | {mark}{rate}{mark} | {metrics['model']['accuracy']:.4f} | "
        f"{metrics['model']['emd_mean']:.4f} |"
      )
  return lines


def _findings(rows: list[dict]) -> list[str]:
  """The methods by their gap to the optimum at each number of cultures, nearest first,
  beside the population-mean predictor's (mean collapse)."""
  lines = []
  counts = sorted({row["num_cultures"] for row in rows if _on_axis(row, "num_cultures")})
  for k, (gap, name) in itertools.product(
    counts, (("accuracy_gap", "accuracy"), ("emd_gap", "EMD"))
  ):
    ranked = sorted(
      (r for r in rows if _on_axis(r, "num_cultures") and r["num_cultures"] == k),
      key=lambda r: r[gap],
    )
    order = " < ".join(f"{r['method']} {study.fmt(r[gap], r[f'{gap}_std'], 3)}" for r in ranked)
    lines.append(
      f"- {k} cultures, {name} gap: {order} (the population-mean predictor's: "
      f"{ranked[0][f'population_mean_{gap}']:.3f})."
    )
  on_axis = [r for r in rows if _on_axis(r, "num_cultures")]
  for gap, name in (("accuracy_gap", "accuracy"), ("emd_gap", "EMD")):
    beaten = {
      k: [
        r["method"]
        for r in on_axis
        if r["num_cultures"] == k and r[gap] < r[f"population_mean_{gap}"]
      ]
      for k in counts
    }
    lines.append(
      f"- Nearer the optimum than the population-mean predictor in {name}: "
      + "; ".join(f"{k} cultures: {', '.join(m) or 'none'}" for k, m in beaten.items())
      + "."
    )
  by = {(r["num_cultures"], r["method"]): r for r in on_axis}
  pairs = [k for k in counts if (k, SOFT) in by and (k, TOP_K) in by]
  if pairs:
    lines.append(
      "- CuMA top-2's gap minus the soft mixture's (positive: sparse routing is further from "
      "the optimum): "
      + "; ".join(
        f"{k} cultures: accuracy {by[k, TOP_K]['accuracy_gap'] - by[k, SOFT]['accuracy_gap']:+.3f}, "
        f"EMD {by[k, TOP_K]['emd_gap'] - by[k, SOFT]['emd_gap']:+.3f}"
        for k in pairs
      )
      + "."
    )
  return lines + _off_axis_findings(rows)


def _off_axis_findings(rows: list[dict]) -> list[str]:
  """At each condition off the culture axis: the nearest method in each gap, the
  population-mean predictor's gaps, and the methods giving every profile one prediction."""
  lines = []
  for axis in ("consensus_fraction", "answer_width"):
    values = sorted({r[axis] for r in rows if r[axis] != getattr(BASE, axis)})
    for value in values:
      at = [r for r in rows if _on_axis(r, axis) and r[axis] == value]
      nearest = {gap: min(at, key=lambda r, gap=gap: r[gap]) for gap in ("accuracy_gap", "emd_gap")}
      collapsed = [r["method"] for r in at if round(r["diversity"], 2) == 1.0]
      lines.append(
        f"- {axis.replace('_', ' ')} {value:g} ({BASE.num_cultures} cultures): nearest the "
        f"optimum {nearest['accuracy_gap']['method']} in accuracy "
        f"({nearest['accuracy_gap']['accuracy_gap']:.3f}) and "
        f"{nearest['emd_gap']['method']} in EMD ({nearest['emd_gap']['emd_gap']:.3f}); the "
        f"population-mean predictor's gaps {at[0]['population_mean_accuracy_gap']:.3f} and "
        f"{at[0]['population_mean_emd_gap']:.3f}"
        + (
          f"; one prediction for every profile (diversity 1.00): {', '.join(collapsed)}"
          if collapsed
          else ""
        )
        + "."
      )
  return lines


def _axis_table(rows: list[dict], axis: str) -> list[str]:
  header = [
    axis.replace("_", " "),
    "method",
    "seeds",
    "accuracy gap ↓",
    "EMD gap ↓",
    "test accuracy",
    "optimum accuracy",
    "population-mean accuracy",
    "profile diversity",
  ]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in sorted(
    (r for r in rows if _on_axis(r, axis)), key=lambda r: (r[axis], METHODS.index(r["method"]))
  ):
    cells = [
      f"{row[axis]:g}",
      row["method"],
      str(row["seeds"]),
      study.fmt(row["accuracy_gap"], row["accuracy_gap_std"], 4),
      study.fmt(row["emd_gap"], row["emd_gap_std"], 4),
      study.fmt(row["accuracy"], row["accuracy_std"], 4),
      f"{row['optimum_accuracy']:.4f}",
      f"{row['population_mean_accuracy']:.4f}",
      study.fmt(row["diversity"], row["diversity_std"], 2),
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _survey(scale: Scale, warmup: str) -> dict:
  """The base condition's survey sizes, batch and backbone warm-up steps, for the page."""
  c = presets.experiment_config("cuma", scale.preset, overrides=scale.data_overrides(BASE, warmup))
  return {
    **c.data.synthetic.to_dict(),
    "batch_size": c.data.batch_size,
    "warmup_steps": c.tiny_backbone.warmup_steps,
  }


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def main(argv=None) -> int:
  platforms.skip_absent_tpu()  # no libtpu start-up errors on a CPU machine
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny preset, 2 culture counts")
  parser.add_argument("--seeds", type=int, nargs="+", default=None)
  parser.add_argument("--steps", type=int, default=None, help="training steps per run")
  parser.add_argument("--warmup", choices=schema.WARMUPS, default="profile_reading")
  parser.add_argument("--out", default=study.HERE, help="where results and the figure go")
  parser.add_argument("--workdir", default=None, help="run workdirs (default OUT/runs/regime)")
  parser.add_argument("--select", action="store_true", help="the learning-rate check on valid")
  parser.add_argument(
    "--report_only", action="store_true", help="rewrite the page and figure from regime.json"
  )
  args = parser.parse_args(argv)
  scale = QUICK_SCALE if args.quick else FULL_SCALE
  if args.steps:
    scale = dataclasses.replace(scale, steps=args.steps)
  seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
  workdir = args.workdir or os.path.join(args.out, "runs", "regime")
  saved_path = os.path.join(args.out, "regime.json")
  start = time.time()

  def log(*message):
    print(f"[{time.time() - start:6.0f}s]", *message, flush=True)

  if args.report_only:
    with open(saved_path) as f:
      saved = json.load(f)
  else:
    os.makedirs(args.out, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    rate = matmul_rate() / 1e9
    log(f"2048x2048 float32 matmul: {rate:.0f} GFLOP/s")
    command = " ".join(
      ["python experiments/mean_collapse/regime.py", *(sys.argv[1:] if argv is None else argv)]
    )
    if args.select:
      selection = select(scale, seeds[0], args.warmup, workdir, log)
      selection.update(command=command, warmup=args.warmup)
      with open(os.path.join(args.out, SELECTION_FILE), "w") as f:
        json.dump(selection, f, indent=1)
      log(f"chosen on valid: {selection['chosen']}")
      return 0
    previous = _read_json(saved_path)
    saved = {
      "command": command,
      "preset": scale.preset,
      "steps": scale.steps,
      "survey": _survey(scale, args.warmup),
      "seeds": seeds,
      "warmup": args.warmup,
      "matmul_gflops": rate,
      "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
      "complete": False,
      "selection": _read_json(os.path.join(args.out, SELECTION_FILE)),
    }
    # A resumed sweep (same size) keeps the record of the invocations that trained its runs.
    same_sweep = previous and all(
      previous.get(k) == saved[k] for k in ("preset", "steps", "survey", "seeds", "warmup")
    )
    earlier = _invocations(previous) if same_sweep else []
    this = {"date": saved["date"], "matmul_gflops": rate, "seconds": 0.0, "trained": 0}
    saved["invocations"] = [*earlier, this]

    def save(conditions: dict) -> None:
      runs = [s for c in conditions.values() for m in c["methods"].values() for s in m["seeds"]]
      this.update(seconds=time.time() - start, trained=sum(not s.get("read_back") for s in runs))
      saved.update(conditions=conditions, seconds=sum(i["seconds"] for i in saved["invocations"]))
      with open(saved_path, "w") as f:
        json.dump(saved, f, indent=1)

    groups = QUICK_GROUPS if args.quick else CONDITION_GROUPS
    result = sweep(scale, groups, seeds, args.warmup, workdir, log, save)
    saved["complete"] = True
    save(result)
  write_report(saved, args.out)
  plot(saved["conditions"], args.out)
  log(f"wrote {args.out}/regime.md, regime.csv, regime.json and figures/regime_map.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
