"""Resumable training checkpoints (Orbax, async) and adapter-only export.

A training checkpoint holds the trainable parameters, the optimiser state, the step, the
data iterator's state, the config (JSON) and fingerprints of its inputs (the backbone, the
demographic encoder, the prepared dataset) — never the frozen backbone, which is re-read from
its own checkpoint directory. Resuming or evaluating a workdir written by a different config,
or with inputs whose contents differ, is refused with what differs, before anything is
overwritten; paths may change (a moved backbone directory still resumes). An unreadable step
(a truncated or missing file) is named; by ``train.on_corrupt_checkpoint`` the run either falls
back to the newest readable step, moving the unreadable ones aside, or stops.
"""

from __future__ import annotations

from collections.abc import Callable
import hashlib
import json
import os
import time
from typing import Any

from flax import traverse_util
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cuma_jax import fields, fingerprint
from cuma_jax.checkpoints.safetensors_io import safetensors_digest, write_safetensors
from cuma_jax.errors import Refusal
from cuma_jax.training.workdir import write_atomically

CORRUPT_CHECKPOINT_POLICIES = ("fallback", "stop")
# What each recorded input fingerprint is of, for the refusal message.
INPUT_SOURCES = {
  "backbone": "model.checkpoint",
  "encoder": "encoder.checkpoint / encoder.precomputed",
  "dataset": "the prepared dataset",
  # A preference stage starts from the previous stage's last checkpoint.
  "previous_stage": "the previous preference stage's last checkpoint",
  "adapter_init": "adapter.init_from",
}


class CheckpointConfigMismatch(Refusal, ValueError):
  pass


class CheckpointInputsMismatch(CheckpointConfigMismatch):
  pass


class UnreadableCheckpoint(Refusal, RuntimeError):
  pass


class NonFiniteCheckpoint(Refusal, ValueError):
  """A step whose parameters or optimiser state hold inf or NaN: unusable like an unreadable
  one (moved aside or stopped at by ``train.on_corrupt_checkpoint``)."""


def _flatten(d, prefix=""):
  out = {}
  for key, value in d.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def exact_differences(saved: dict, current: dict) -> list[str]:
  """Every dotted key whose value differs (the strictest resume check)."""
  a, b = _flatten(saved), _flatten(current)
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def config_to_json(config) -> dict:
  """A JSON-safe dict of a typed config (``cuma_jax.schema.Config``; tuples become lists)."""
  return json.loads(json.dumps(fields.as_dict(config)))


def input_fingerprints(
  *, backbone: str, encoder: str | None, dataset: str, adapter_init: str = ""
) -> dict:
  """Fingerprints (:mod:`cuma_jax.fingerprint`) of what a trained state depends on."""
  inputs = {
    "backbone": fingerprint.fingerprint(backbone),
    "encoder": None if encoder is None else fingerprint.fingerprint(encoder),
    "dataset": fingerprint.fingerprint(dataset),
  }
  if adapter_init:  # absent otherwise, as in checkpoints written before the key existed
    inputs["adapter_init"] = fingerprint.fingerprint(adapter_init)
  return inputs


def input_differences(saved: dict, current: dict) -> list[str]:
  """One phrase per input whose files differ, naming the input and the files."""
  return [
    f"{name} ({source}): "
    + ", ".join(fingerprint.differences(saved.get(name) or {}, current.get(name) or {}))
    for name, source in INPUT_SOURCES.items()
    if fingerprint.differences(saved.get(name) or {}, current.get(name) or {})
  ]


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's handler of the training state, except that on CPU each replicated array is
  written whole by its first replica: Orbax's replica-parallel writing slices it into one
  piece per replica, and host devices share one memory, so on CPU the slices only add a
  dispatch each (8 host devices: a tenth of the preference run's time)."""
  arrays = ocp.type_handlers.get_type_handler(jax.Array)
  if jax.default_backend() == "cpu":
    arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
  handlers = [
    (kind, arrays if kind is jax.Array else ocp.type_handlers.get_type_handler(kind))
    for kind in ocp.type_handlers.supported_types()
  ]
  return ocp.PyTreeCheckpointHandler(
    type_handler_registry=ocp.type_handlers.create_type_handler_registry(*handlers)
  )


class TrainCheckpoints:
  """``CheckpointManager`` over {state, data, config, inputs} items, keeping the last K steps.

  ``inputs``: :func:`input_fingerprints` to record and to check on restore (None: unchecked).
  ``config_conflicts(saved, current)`` names the config changes a resume refuses (the
  experiment job passes the schema's classification of keys).
  ``read_only``: creates and cleans nothing (for checks before the workdir is locked).
  """

  def __init__(
    self,
    directory: str,
    *,
    config_json: dict,
    save_every: int = 1,
    keep: int = 1,
    inputs: dict | None = None,
    config_conflicts: Callable[[dict, dict], list[str]] = exact_differences,
    on_corrupt: str = "fallback",
    read_only: bool = False,
    log=print,
  ):
    if on_corrupt not in CORRUPT_CHECKPOINT_POLICIES:
      raise ValueError(
        f"config.train.on_corrupt_checkpoint={on_corrupt!r}; allowed: {CORRUPT_CHECKPOINT_POLICIES}"
      )
    self.directory = os.path.abspath(directory)
    self.config_json, self.inputs = config_json, inputs
    self.config_conflicts = config_conflicts
    self.on_corrupt, self.log = on_corrupt, log
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=save_every,
        enable_async_checkpointing=True,
        # A killed save leaves a temporary directory; only the workdir's lock holder may
        # remove it. (Orbax's own read_only option logs warnings on every use.)
        cleanup_tmp_directories=not read_only,
        create=not read_only,
      ),
      item_handlers={
        "state": _state_handler(),
        **{name: ocp.JsonCheckpointHandler() for name in ("data", "config", "inputs")},
      },
    )

  @classmethod
  def of(cls, config, directory: str, **kwargs) -> TrainCheckpoints:
    """The checkpoints of ``config``'s training run in ``directory``."""
    return cls(
      directory,
      config_json=config_to_json(config),
      save_every=config.train.checkpoint_every,
      keep=config.train.keep_checkpoints,
      on_corrupt=config.train.on_corrupt_checkpoint,
      **kwargs,
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def saved_config(self, step: int) -> dict:
    """The config (JSON) a checkpoint was written with."""
    restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored["config"]

  def check(self, step: int) -> None:
    """Refuses ``step`` if it was written by another config or from other inputs."""
    saved = self.manager.restore(
      step, args=ocp.args.Composite(config=ocp.args.JsonRestore(), inputs=ocp.args.JsonRestore())
    )
    differences = self.config_conflicts(saved["config"], self.config_json)
    if differences:
      raise CheckpointConfigMismatch(
        f"{self.directory} holds checkpoints of another config (step {step}); these keys "
        f"differ: {differences}. Use a new --workdir or restore the original config."
      )
    if self.inputs is None:
      return
    changed = input_differences(saved["inputs"], self.inputs)
    if changed:
      raise CheckpointInputsMismatch(
        f"{self.directory} (step {step}) was trained from other inputs: {'; '.join(changed)}. "
        "Point the config back at the original files, or use a new --workdir."
      )

  def check_latest(self) -> int | None:
    """Checks the newest step whose config can be read (:meth:`check`); returns it.

    Steps that cannot be read are left to :meth:`restore_latest`.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        self.check(step)
      except CheckpointConfigMismatch:
        raise
      except Exception:
        continue
      return step
    return None

  def should_save(self, step: int) -> bool:
    """Whether :meth:`save` at ``step`` would write (the save interval and policy)."""
    return self.manager.should_save(step)

  def save(self, step: int, state: dict, data_state: Any, force: bool = False) -> bool:
    return self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(self.config_json),
        inputs=ocp.args.JsonSave(self.inputs or {}),
      ),
      force=force,
    )

  def restore(self, step: int, abstract_state: dict) -> tuple[dict, Any]:
    """The state and data iterator state of ``step``; refuses a state holding inf or NaN
    (written before training checked each step's state), which must never be scored."""
    self.check(step)
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)
        ),
        data=ocp.args.JsonRestore(),
      ),
    )
    leaves = [x for x in jax.tree.leaves(restored["state"]) if jnp.issubdtype(x.dtype, jnp.inexact)]
    bad = sum(not bool(jnp.isfinite(x).all()) for x in leaves)
    if bad:
      raise NonFiniteCheckpoint(f"{bad} of its {len(leaves)} float arrays hold inf or NaN")
    return restored["state"], restored["data"]

  def restore_latest(self, abstract_state: dict) -> tuple[int, dict, Any] | None:
    """(step, state, data iterator state) of the newest readable step; None without steps.

    Unreadable steps newer than it are moved aside (``<step>.unreadable-<time>``) so that
    training can write those steps again; with ``on_corrupt='stop'`` the first one stops.
    """
    unreadable = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, data_state = self.restore(step, abstract_state)
      except CheckpointConfigMismatch:
        raise
      except Exception as e:
        unreadable.append((step, _reason(e)))
        if self.on_corrupt == "stop":
          raise UnreadableCheckpoint(self._stop_message(step, _reason(e))) from e
        continue
      for bad, reason in unreadable:
        moved = self._move_aside(bad)
        self.log(
          f"checkpoint step {bad} in {self.directory} is unreadable ({reason}); moved it to "
          f"{moved}; resuming from step {step}"
        )
      return step, state, data_state
    if unreadable:
      raise UnreadableCheckpoint(
        f"no step in {self.directory} is readable: "
        + "; ".join(f"step {s}: {reason}" for s, reason in unreadable)
        + ". Move the directory away to start afresh."
      )
    return None

  def _stop_message(self, step: int, reason: str) -> str:
    older = [s for s in self.manager.all_steps() if s < step]
    then = f"an older step ({max(older)})" if older else "the start"
    path = os.path.join(self.directory, str(step))
    return (
      f"checkpoint step {step} in {self.directory} is unreadable ({reason}); stopping "
      f"(config.train.on_corrupt_checkpoint='stop'). To discard it and resume from {then}, "
      f"move it away (mv {path} {path}.unreadable) or delete it, or rerun with "
      "--config.train.on_corrupt_checkpoint=fallback, which does that itself."
    )

  def _move_aside(self, step: int) -> str:
    path = os.path.join(self.directory, str(step))
    target = f"{path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      os.rename(path, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"moved aside unreadable checkpoint {step}")
    self.manager.reload()
    return target

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def check_workdir(
  config,
  directory: str,
  inputs: dict | None = None,
  config_conflicts: Callable[[dict, dict], list[str]] = exact_differences,
) -> int | None:
  """The newest step in ``directory`` after refusing another config's (or inputs') steps.

  Reads only: usable before the workdir is locked, and on a directory that does not exist.
  """
  ckpt = TrainCheckpoints.of(
    config, directory, inputs=inputs, config_conflicts=config_conflicts, read_only=True
  )
  try:
    return ckpt.check_latest()
  finally:
    ckpt.close()


def _reason(error: BaseException) -> str:
  """The root cause's first line (TensorStore wraps it in a many-line spec dump)."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines() or [""]
  return f"{type(error).__name__}: {lines[0][:300]}"


def to_host(array) -> np.ndarray:
  """A whole array on this host, gathered from the other processes where it spans them."""
  if isinstance(array, jax.Array) and not array.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(jax.device_get(array))


def export_adapters(trainable, adapter_config: dict, directory: str, log=print) -> dict[str, str]:
  """Writes the trained adapters alone (safetensors + adapter_config.json) for inference;
  returns each file's SHA-256 (recorded in results.json).

  A file already there is kept when its digest is the one this export would write, and
  rewritten (logging it) when not: a damaged export is repaired from the checkpoint whenever
  a run ends or evaluates. Tensor names are the '/'-joined parameter paths;
  :func:`load_adapters` inverts them. Every process must call it; process 0 writes.
  """
  flat = traverse_util.flatten_dict(jax.tree.map(to_host, trainable))
  tensors = [("/".join(path), np.asarray(value)) for path, value in sorted(flat.items())]
  config_text = json.dumps(adapter_config, indent=2, sort_keys=True)
  writers = {  # file -> (its digest, how to write it)
    "adapters.safetensors": (
      safetensors_digest(tensors),
      lambda path: write_safetensors(path, iter(tensors)),
    ),
    "adapter_config.json": (
      hashlib.sha256(config_text.encode()).hexdigest(),
      lambda path: write_atomically(path, config_text),
    ),
  }
  expected = {name: digest for name, (digest, _) in writers.items()}
  if jax.process_index() != 0:  # Every process gathers (a collective); one writes.
    return expected
  os.makedirs(directory, exist_ok=True)
  for name, (digest, write) in writers.items():
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      found = fingerprint.full_digest(path)
      if found == digest:
        continue
      log(
        f"{path} is not the checkpoint's export (sha256 {found[:12]}, expected "
        f"{digest[:12]}); rewrote it from the checkpoint"
      )
    write(path)
  return expected


def load_adapters(directory: str) -> tuple[dict, dict]:
  """(adapter parameter tree of numpy arrays, adapter config dict) from export_adapters."""
  from cuma_jax.checkpoints.safetensors_io import TensorIndex

  index = TensorIndex(directory, filename="adapters.safetensors")
  flat = {tuple(name.split("/")): np.array(index.read(name)) for name in index.names()}
  with open(os.path.join(directory, "adapter_config.json")) as f:
    return traverse_util.unflatten_dict(flat), json.load(f)
