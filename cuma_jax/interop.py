"""A trained workdir's adapters for other libraries, with a model card (docs/interop.md).

:func:`export_adapters` writes the adapters a run left in ``WORKDIR/adapters`` as a PEFT
LoRA adapter (``peft``), the released PyTorch CuMA layout (``cuma_release``) or our own
layout (``native``), each with a ``README.md`` model card written from the run's config and
results.  A LoRA baseline of ``eval.baselines`` is a workdir of its own,
``WORKDIR/baselines/lora``.  The way back is ``adapter.init_from``
(:mod:`cuma_jax.checkpoints.adapter_import`).
"""

from __future__ import annotations

import glob
import json
import os
import shutil

from flax import traverse_util
import numpy as np

from cuma_jax import runtime, schema, tasks
from cuma_jax.checkpoints import adapter_formats, cuma_release, peft
from cuma_jax.checkpoints.adapter_formats import NATIVE_WEIGHTS, FormatError
from cuma_jax.checkpoints.safetensors_io import TensorIndex

FORMATS = ("peft", "cuma_release", "native")
CARD = "README.md"
RUN_CONFIG = "cuma_jax_config.json"
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "chat_template*", "vocab.json")


def _run_config_and_results(workdir: str) -> tuple[schema.Config, dict]:
  """The run's config and results (results.json; else the latest checkpoint's config)."""
  path = os.path.join(workdir, "results.json")
  if os.path.isfile(path):
    with open(path) as f:
      results = json.load(f)
    return schema.from_dict(results["run"]["config"]), results
  return tasks.saved_config(workdir), {}


def _trained_adapters(workdir: str) -> dict:
  directory = os.path.join(workdir, "adapters")
  if not os.path.isfile(os.path.join(directory, NATIVE_WEIGHTS)):
    raise FileNotFoundError(
      f"{workdir} has no trained adapters in {directory} (written when training finishes)"
    )
  index = TensorIndex(directory, filename=NATIVE_WEIGHTS)
  tree = {tuple(n.split("/")): np.array(index.read(n)) for n in index.names()}
  return adapter_formats.unstack(traverse_util.unflatten_dict(tree))


def base_model(config: schema.Config, workdir: str) -> str:
  """The backbone's directory: the config's, or the tiny backbone the run built."""
  if config.model.checkpoint:
    return config.model.checkpoint
  built = sorted(glob.glob(os.path.join(workdir, "assets", "tiny_backbone_*", "warmed_up")))
  return built[-1] if built else schema.TINY


def export_adapters(
  workdir: str, out: str, format: str = "peft", *, command: str | None = None
) -> str:
  """Writes ``workdir``'s trained adapters to ``out`` in ``format`` with a model card.

  Refused, naming the config key, when the format cannot represent the run; nothing is
  written then.  ``command``: what produced the export, for the card (default: this
  process's command line).  Returns ``out``.
  """
  if format not in FORMATS:
    raise ValueError(f"format={format!r}; allowed: {FORMATS}")
  config, results = _run_config_and_results(workdir)
  adapter = schema.adapter_config(config)
  if adapter is None:
    raise FormatError(f"{workdir} is a full fine-tuning run (method='full'): it has no adapters")
  if format == "peft":
    _check_peft(adapter, workdir)
  elif format == "cuma_release":
    cuma_release.check_exportable(adapter)
  flat = _trained_adapters(workdir)
  layers = adapter_formats.num_layers(flat)
  backbone = base_model(config, workdir)
  model = runtime.architecture(config)
  if format == "peft":
    peft.export(flat, adapter, layers, out, base_model=backbone)
  elif format == "cuma_release":
    cuma_release.export(
      flat,
      adapter,
      layers,
      out,
      base_model=backbone,
      model_type=model.model_type,
      hidden_size=model.hidden_size,
      lambda_aux=config.optim.lambda_aux,
    )
    _copy_tokenizer(backbone, out)
  else:
    os.makedirs(out, exist_ok=True)
    for name in (NATIVE_WEIGHTS, adapter_formats.CONFIG_FILE):
      shutil.copy(os.path.join(workdir, "adapters", name), os.path.join(out, name))
  with open(os.path.join(out, RUN_CONFIG), "w") as f:
    json.dump(results.get("run") or {"config": schema.as_dict(config)}, f, indent=2)
  card = model_card(
    config, results, format=format, base=backbone, command=command or runtime.command_line()
  )
  with open(os.path.join(out, CARD), "w") as f:
    f.write(card)
  return out


def _check_peft(adapter, workdir: str) -> None:
  try:
    peft.check_exportable(adapter)
  except FormatError as e:
    lora = os.path.join(workdir, "baselines", "lora")
    if os.path.isdir(lora):
      raise FormatError(f"{e}; its LoRA baseline exports with --workdir={lora}") from None
    raise


def _copy_tokenizer(backbone: str, out: str) -> None:
  """The release saves the tokenizer beside the adapters."""
  for pattern in TOKENIZER_FILES:
    for path in glob.glob(os.path.join(backbone, pattern)):
      shutil.copy(path, out)


FORMAT_TITLES = {
  "peft": "a PEFT LoRA adapter (peft.PeftModel.from_pretrained on the base model)",
  "cuma_release": "the released PyTorch CuMA module's checkpoint layout",
  "native": "cuma_jax's own adapter layout (adapter.init_from, cuma_jax.restore)",
}


def _metric_rows(results: dict) -> list[tuple[str, str, str, float]]:
  """(stage, split, metric, value) of the run's own model, trained and untrained."""
  rows = []
  for stage in ("untrained", "base", "trained"):
    by_split = results.get(stage)
    if not isinstance(by_split, dict):
      continue
    for split, value in by_split.items():
      metrics = value.get("model", value) if isinstance(value, dict) else {}
      for name, number in metrics.items() if isinstance(metrics, dict) else ():
        if isinstance(number, (int, float)) and not isinstance(number, bool):
          rows.append((stage, split, name, float(number)))
  return rows


def _model_name(base: str) -> str:
  path = os.path.normpath(base)
  if base == schema.TINY or os.path.basename(os.path.dirname(path)).startswith("tiny_backbone_"):
    return "the tiny Qwen3 backbone"
  return os.path.basename(path)


def model_card(
  config: schema.Config, results: dict, *, format: str, base: str, command: str
) -> str:
  """The export's README.md: model, method, data, metrics by split, and provenance."""
  a = config.adapter
  routed = a.router != "none"
  method = config.method + (f" (ablation {config.ablation})" if config.ablation != "none" else "")
  data = config.data
  if data.dataset == "wvb":
    dataset = f"WorldValuesBench ({data.builder_config})"
  elif data.dataset == "synthetic":
    dataset = f"the synthetic survey (seed {data.synthetic.seed})"
  else:
    dataset = data.dataset
  steps = (
    config.train.num_steps if config.train.num_steps > 0 else f"{config.train.num_epochs} epochs"
  )
  lines = [
    f"# {config.method} adapters on {_model_name(base)}",
    "",
    f"Trained with cuma_jax and exported as {FORMAT_TITLES[format]}.",
    "",
    "## Model",
    f"- Base model: `{base}`",
    f"- Method: {method}",
    f"- Targets: {', '.join(a.targets) or 'none'}",
    f"- Rank {a.rank}, alpha {a.alpha:g} (scale alpha / rank = {a.alpha / a.rank:g})",
    f"- Experts: {a.num_experts}"
    + (
      f", top-{a.top_k}, gate `{a.gate}`, router `{a.router}` (hidden {list(a.router_hidden)}), "
      f"{'shared' if a.shared_a else 'per-expert'} A, "
      f"{'routers shared per input' if a.share_router else 'one router per projection'}"
      if routed
      else " (plain LoRA, no router)"
    ),
    "",
    "## Data",
    f"- Dataset: {dataset}, task `{config.task}`",
    f"- Trained on the `train` split: {steps} steps of {data.batch_size} sequences "
    f"(max length {data.max_length}), seed {config.seed}",
    f"- Evaluated on: {', '.join(config.eval.splits)}",
    "",
    "## Results",
  ]
  rows = _metric_rows(results)
  if rows:
    lines += ["| model | split | metric | value |", "|---|---|---|---|"]
    lines += [f"| {stage} | {split} | {name} | {value:.4f} |" for stage, split, name, value in rows]
  else:
    lines.append("No results.json: the run was not evaluated.")
  trained_by = (results.get("run") or {}).get("command")
  lines += [
    "",
    "## Provenance",
    f"- Trained by: `{trained_by}`" if trained_by else "- Trained by: cuma_jax.main",
    f"- Exported by: `{command}`",
    f"- The run's whole config: `{RUN_CONFIG}`",
    "",
  ]
  return "\n".join(lines)
