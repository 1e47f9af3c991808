"""Resumable training checkpoints (Orbax, async) and adapter-only export.

A training checkpoint holds the trainable parameters, the optimiser state, the step, the
data iterator's state and the config (JSON) — never the frozen backbone,
which is re-read from its own checkpoint directory.  Resuming into a workdir written by
a different config is refused with the keys that differ, before anything is overwritten.
"""

from __future__ import annotations

import json
import os
from typing import Any

from flax import traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp

from cuma_jax.checkpoints.safetensors_io import write_safetensors
from cuma_jax.training.workdir import write_atomically

# Keys whose change makes an existing checkpoint belong to another experiment; the
# per-step RNG is derived from ``seed`` and the step, so it needs no saving of its own.
IDENTITY_KEYS = ("method", "ablation", "model", "encoder", "adapter", "trainable", "data", "seed")
# Under IDENTITY_KEYS but free to change on resume: where files live, and memory knobs.
RELOCATABLE_KEYS = (
  "model.checkpoint",
  "encoder.checkpoint",
  "encoder.precomputed",
  "data.data_dir",
  "data.manual_dir",
  "model.remat",
)


class CheckpointConfigMismatch(ValueError):
  pass


def _flatten(d, prefix=""):
  out = {}
  for key, value in d.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def config_differences(saved: dict, current: dict) -> list[str]:
  """Dotted keys under IDENTITY_KEYS whose values differ between two config dicts."""
  a = _flatten({k: saved.get(k) for k in IDENTITY_KEYS})
  b = _flatten({k: current.get(k) for k in IDENTITY_KEYS})
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RELOCATABLE_KEYS)


def config_to_json(config) -> dict:
  """A JSON-safe dict of an ml_collections config (tuples become lists)."""
  return json.loads(config.to_json())


class TrainCheckpoints:
  """``CheckpointManager`` over {state, data, config} items, keeping the last K steps."""

  def __init__(self, directory: str, *, save_every: int, keep: int, config_json: dict):
    self.directory = os.path.abspath(directory)
    self.config_json = config_json
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every, enable_async_checkpointing=True
      ),
      item_names=("state", "data", "config"),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def check_config(self, step: int) -> None:
    saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    differences = config_differences(saved["config"], self.config_json)
    if differences:
      raise CheckpointConfigMismatch(
        f"{self.directory} holds checkpoints of another config (step {step}); these keys "
        f"differ: {differences}. Use a new --workdir or restore the original config."
      )

  def save(self, step: int, state: dict, data_state: Any, force: bool = False) -> bool:
    return self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(self.config_json),
      ),
      force=force,
    )

  def restore(self, step: int, abstract_state: dict) -> tuple[dict, Any]:
    self.check_config(step)
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
      ),
    )
    return restored["state"], restored["data"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def export_adapters(trainable, adapter_config: dict, directory: str) -> str:
  """Writes the trained adapters alone (safetensors + adapter_config.json) for inference.

  Tensor names are the '/'-joined parameter paths; :func:`load_adapters` inverts them.
  """
  os.makedirs(directory, exist_ok=True)
  flat = traverse_util.flatten_dict(jax.device_get(trainable))
  write_safetensors(
    os.path.join(directory, "adapters.safetensors"),
    (("/".join(path), np.asarray(value)) for path, value in sorted(flat.items())),
  )
  write_atomically(
    os.path.join(directory, "adapter_config.json"),
    json.dumps(adapter_config, indent=2, sort_keys=True),
  )
  return directory


def load_adapters(directory: str) -> tuple[dict, dict]:
  """(adapter parameter tree of numpy arrays, adapter config dict) from export_adapters."""
  from cuma_jax.checkpoints.safetensors_io import TensorIndex

  index = TensorIndex(directory, filename="adapters.safetensors")
  flat = {tuple(name.split("/")): np.array(index.read(name)) for name in index.names()}
  with open(os.path.join(directory, "adapter_config.json")) as f:
    return traverse_util.unflatten_dict(flat), json.load(f)
