"""PEFT LoRA adapter directories, both ways (docs/interop.md#peft).

A plain-LoRA run (``adapter.router='none'``, one expert) is a PEFT ``LoraConfig`` adapter:
``adapter_config.json`` and ``adapter_model.safetensors`` with the tensors
``base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A,B}.weight`` ([r, in] and
[out, r]) and the scale alpha / r, which ``peft.PeftModel.from_pretrained`` loads onto the
Hugging Face backbone.  A PEFT directory imports only when it is exactly that: the features
PEFT has and our LoRA lacks are refused, naming the config key.
"""

from __future__ import annotations

import json
import os

from cuma_jax.checkpoints.adapter_formats import (
  CONFIG_FILE,
  FormatError,
  Part,
  Row,
  export_rows,
  hf_module,
  import_rows,
  lora_path,
  ordered_targets,
  read_config,
)
from cuma_jax.checkpoints.safetensors_io import TensorIndex, write_safetensors
from cuma_jax.layers.adapter_config import TARGET_MODULES, AdapterConfig

WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers"
# PEFT keys whose non-default value means a model our LoRA does not compute: key -> the
# values we accept (None and empty containers count as unset).
UNSUPPORTED = {
  "use_dora": (False,),
  "use_rslora": (False,),
  "bias": ("none",),
  "lora_bias": (False,),
  "modules_to_save": (None, ()),
  "rank_pattern": (None, ()),
  "alpha_pattern": (None, ()),
  "layers_to_transform": (None, ()),
  "layer_replication": (None, ()),
  "fan_in_fan_out": (False,),
  "use_qalora": (False,),
  "trainable_token_indices": (None, ()),
  "target_parameters": (None, ()),
}


def check_exportable(adapter: AdapterConfig) -> None:
  """Refuses a run PEFT's LoRA cannot express, naming the key."""
  if adapter.router != "none" or adapter.num_experts != 1:
    raise FormatError(
      f"--format=peft holds plain LoRA (adapter.router='none', num_experts=1); this run has "
      f"adapter.router={adapter.router!r}, num_experts={adapter.num_experts}: export it as "
      "cuma_release or native"
    )
  if adapter.prefix_length:
    raise FormatError(
      f"adapter.prefix_length={adapter.prefix_length}: prefix tuning is not a PEFT LoRA adapter"
    )
  if adapter.demographic_projection:
    raise FormatError("adapter.demographic_projection is set: plain LoRA reads no demographics")


def rows(adapter: AdapterConfig, num_layers: int) -> list[Row]:
  out = []
  for i in range(num_layers):
    for t in ordered_targets(adapter):
      name = f"{PREFIX}.{i}.{hf_module(t)}.{t}"
      a_expert = None if adapter.shared_a else 0
      out.append(Row(f"{name}.lora_A.weight", (Part((i, lora_path(t, "a")), a_expert),)))
      out.append(Row(f"{name}.lora_B.weight", (Part((i, lora_path(t, "b")), 0),)))
  return out


def export(flat, adapter: AdapterConfig, num_layers: int, directory: str, base_model: str) -> None:
  """Writes ``flat`` (:func:`~cuma_jax.checkpoints.adapter_formats.unstack` of the trained
  adapters) as a PEFT LoRA directory."""
  check_exportable(adapter)
  tensors = export_rows(rows(adapter, num_layers), flat)
  os.makedirs(directory, exist_ok=True)
  write_safetensors(os.path.join(directory, WEIGHTS), tensors, metadata={"format": "pt"})
  config = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base_model,
    "r": adapter.rank,
    "lora_alpha": adapter.alpha,
    "lora_dropout": adapter.dropout,
    "target_modules": ordered_targets(adapter),
    "bias": "none",
    "use_rslora": False,
    "use_dora": False,
    "fan_in_fan_out": False,
    "init_lora_weights": True,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "inference_mode": True,
  }
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2)


def _unset(value) -> bool:
  return value is None or value in ((), [], {})


def settings(directory: str) -> dict:
  """Our adapter keys for a PEFT LoRA directory, after refusing what we do not model."""
  config = read_config(directory)
  if config.get("peft_type") != "LORA":
    raise FormatError(f"{directory}: peft_type={config.get('peft_type')!r}, not 'LORA'")
  for key, allowed in UNSUPPORTED.items():
    value = config.get(key)
    if key in config and not (value in allowed or (None in allowed and _unset(value))):
      raise FormatError(
        f"{directory}: PEFT {key}={value!r} is not supported (cuma_jax's LoRA has "
        f"{key}={allowed[0]!r}); "
        + ("per-module ranks or alphas are not modelled" if key.endswith("_pattern") else "")
      )
  targets = config.get("target_modules")
  if isinstance(targets, str) or not targets or any(t not in TARGET_MODULES for t in targets):
    raise FormatError(
      f"{directory}: PEFT target_modules={targets!r}; supported is a list of {TARGET_MODULES}"
    )
  return {
    "targets": tuple(t for t in TARGET_MODULES if t in targets),
    "rank": int(config["r"]),
    "alpha": float(config["lora_alpha"]),
    "router": "none",
    "num_experts": 1,
    "top_k": 1,
    "prefix_length": 0,
  }


def load(directory: str, adapter: AdapterConfig, shapes: dict, dtype) -> dict:
  """Our per-layer adapter arrays from a PEFT directory, every tensor checked."""
  index = TensorIndex(directory, filename=WEIGHTS)
  layers = 1 + max(layer for layer, _ in shapes if layer is not None)
  return import_rows(
    rows(adapter, layers),
    index.read,
    {n: index.shape(n) for n in index.names()},
    shapes,
    f"{directory}/{WEIGHTS}",
    dtype,
  )
