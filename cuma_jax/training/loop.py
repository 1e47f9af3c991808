"""The SFT training loop: resumable, sharded, observable; importable from a notebook.

:func:`train` runs :func:`~cuma_jax.training.step.make_train_step` over a grain iterator,
checkpointing {trainable params, optimiser state, step, data iterator state, config} with
Orbax and resuming from the workdir's latest checkpoint.  Step ``s`` draws its dropout RNG
from ``fold_in(seed, s)``, so a resumed run continues the same random stream.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import optax
from tqdm import tqdm

from cuma_jax import sharding
from cuma_jax.errors import Refusal
from cuma_jax.models.pretrained import abstract_params
from cuma_jax.params import partition, split_params
from cuma_jax.training import checkpointing, optim
from cuma_jax.training.metrics_log import MetricWriter
from cuma_jax.training.step import Objective, demographics_for, make_train_step, sft_objective

# Metrics every objective returns, read by name; any others are logged as they are.
_READ_METRICS = (
  "loss",
  "task_loss",
  "balance_loss",
  "grad_norm",
  "input_tokens",
  "expert_counts",
  "supervised_tokens",
  "state_finite",
)
# Seconds between progress lines when stderr is not a terminal.
LOG_PROGRESS_SECONDS = 10.0


class NonFiniteLoss(Refusal, FloatingPointError):
  pass


@dataclasses.dataclass
class TrainResult:
  trainable: Any
  frozen: Any
  step: int
  losses: list[float]


def total_steps(
  config,
  examples_per_epoch: int,
  *,
  num_steps: int | None = None,
  num_epochs: int | None = None,
  batch_size: int | None = None,
) -> int:
  """Optimiser updates: ``num_steps`` if positive, else ``num_epochs`` over the data in
  batches of ``batch_size`` per process (defaults: ``train.num_steps``, ``train.num_epochs``,
  ``data.batch_size``), after gradient accumulation."""
  num_steps = config.train.num_steps if num_steps is None else num_steps
  if num_steps > 0:
    return num_steps
  num_epochs = config.train.num_epochs if num_epochs is None else num_epochs
  batch_size = batch_size or config.data.batch_size
  batches = examples_per_epoch // (batch_size * jax.process_count())
  return max(num_epochs * batches // config.optim.accumulation_steps, 1)


@dataclasses.dataclass(frozen=True)
class ShardedStep:
  """The jitted training step and where each of its inputs lives (see :meth:`of`)."""

  step: Any  # (trainable, frozen, opt_state, table, batch, rng) -> (trainable, opt_state, metrics)
  trainable: Any
  frozen: Any
  opt_state: Any

  @classmethod
  def of(
    cls, config, module, layout: sharding.Layout, tx, trainable, objective: Objective | None = None
  ) -> ShardedStep:
    """The step of :func:`train` on ``layout`` (``trainable`` may be abstract: the AOT plan
    lowers this same step from shapes alone); ``objective`` defaults to the survey SFT."""
    trainable_sh, frozen_sh = partition(
      layout.param_shardings(abstract_params(module)), config.trainable
    )
    replicated = layout.replicated
    opt_sh = _optimizer_shardings(tx, trainable, trainable_sh, replicated)
    step_fn = make_train_step(objective or default_objective(config, module), tx)

    def full_step(trainable, frozen, opt_state, table, batch, rng):
      z = demographics_for(table, batch)
      return step_fn(trainable, frozen, opt_state, batch, z, rng)

    with layout.active():
      jitted = jax.jit(
        full_step,
        in_shardings=(trainable_sh, frozen_sh, opt_sh, replicated, layout.batch, replicated),
        out_shardings=(trainable_sh, opt_sh, replicated),
        donate_argnums=(0, 2),
      )
    return cls(step=jitted, trainable=trainable_sh, frozen=frozen_sh, opt_state=opt_sh)


def default_objective(config, module) -> Objective:
  """The survey's SFT objective with the config's balance-loss weight and label smoothing."""
  return sft_objective(
    module, lambda_aux=config.optim.lambda_aux, label_smoothing=config.optim.label_smoothing
  )


def train(
  config,
  workdir: str,
  module,
  params,
  train_dataset,
  *,
  num_steps: int,
  demographic_table=None,
  inputs=None,
  config_conflicts=checkpointing.exact_differences,
  objective: Objective | None = None,
  optim_overrides: dict | None = None,
  log=print,
) -> TrainResult:
  """Trains ``module``'s trainable parameters; resumes from ``workdir`` when it has a checkpoint.

  ``train_dataset`` is an (infinitely repeating) grain IterDataset of numpy batches;
  ``demographic_table`` is [num_profiles, d] (batches carry ``profile_index``) or None;
  ``inputs`` are :func:`checkpointing.input_fingerprints`, recorded and checked on resume;
  ``config_conflicts(saved, current)`` lists the config changes a resume refuses;
  ``objective`` is what is optimised (default: the survey SFT) and ``optim_overrides``
  replaces keys of ``config.optim`` (a preference stage's own rate and schedule).
  """
  os.makedirs(workdir, exist_ok=True)
  layout = sharding.Layout.of(config.mesh)
  steps = num_steps
  updates_per_step = config.optim.accumulation_steps
  optim_config = dataclasses.replace(config.optim, **(optim_overrides or {}))
  objective = objective or default_objective(config, module)
  tx = optim.make_optimizer(optim_config, steps)
  schedule = optim.learning_rate_schedule(optim_config, steps)
  sharded, trainable, frozen, opt_state, table = _placed(
    config, module, params, layout, tx, objective, demographic_table
  )
  jitted, batch_sh = sharded.step, layout.batch

  ckpt = checkpointing.TrainCheckpoints.of(
    config,
    os.path.join(workdir, "checkpoints"),
    inputs=inputs,
    config_conflicts=config_conflicts,
    log=log,
  )
  iterator = iter(train_dataset)
  base_rng = jax.random.PRNGKey(config.seed)
  start, last_good = 0, None
  restored = ckpt.restore_latest(_abstract(trainable, opt_state))
  if restored is not None:
    last_good, state, data_state = restored
    trainable, opt_state, start = state["trainable"], state["opt_state"], int(state["step"])
    iterator.set_state(data_state)
    log(f"resumed from {ckpt.directory} at step {start}")

  writer = MetricWriter(
    workdir,
    enabled=jax.process_index() == 0,
    resume_step=start,
    log_every=config.train.log_every,
    log=log,
  )
  bar = progress_bar(steps, start, enabled=config.train.progress_bar and jax.process_index() == 0)
  record = _StepRecord(config, steps, schedule, ckpt, writer, bar, last_good)

  # The host reads a step's metrics only after dispatching the next one, so it prepares the
  # next batch while the device computes; a step is checked before its state is saved.
  unread = None  # (step, its micro-batches' metrics) dispatched but not yet read
  try:
    for step in range(start, steps):
      accumulated = []
      for micro in range(updates_per_step):
        rng = jax.random.fold_in(base_rng, step * updates_per_step + micro)
        batch = next(iterator)
        record.truncated += int(np.sum(batch.get("truncated_tokens", 0)))
        if objective.prepare is not None:
          batch = objective.prepare(batch, trainable, frozen, table, jax.random.fold_in(rng, 1))
        batch = _device_batch(batch, batch_sh, objective)
        with layout.active():
          trainable, opt_state, metrics = jitted(trainable, frozen, opt_state, table, batch, rng)
        accumulated.append(metrics)
      if unread is not None:
        previous, unread = unread, None
        record(*previous)
      done = step + 1
      if ckpt.should_save(done) or done == steps:
        record(done, accumulated)
        if ckpt.save(done, _state(trainable, opt_state, done), iterator.get_state()):
          record.last_good = done
      else:
        unread = (done, accumulated)
  except BaseException:
    if unread is not None:  # An interrupted run still logs the step it finished.
      record(*unread)
    raise
  finally:
    bar.close()
    ckpt.wait()
    writer.close()
  if ckpt.latest_step() != steps and steps > start:
    ckpt.save(steps, _state(trainable, opt_state, steps), iterator.get_state(), force=True)
    ckpt.wait()
  ckpt.close()
  return TrainResult(
    trainable=trainable, frozen=frozen, step=max(start, steps), losses=record.losses
  )


def _placed(config, module, params, layout: sharding.Layout, tx, objective, demographic_table):
  """The jitted step on ``layout`` and what it reads, placed where it wants it: the trainable
  and (in ``model.param_dtype``) frozen parameters, fresh optimiser state, the table."""
  frozen_dtype = jnp.dtype(config.model.param_dtype)
  trainable, frozen = split_params(params, config.trainable, frozen_dtype=frozen_dtype)
  sharded = ShardedStep.of(config, module, layout, tx, trainable, objective)
  trainable = jax.device_put(trainable, sharded.trainable)
  frozen = jax.device_put(frozen, sharded.frozen)
  opt_state = jax.jit(tx.init, out_shardings=sharded.opt_state)(trainable)
  table = None
  if demographic_table is not None:
    table = jax.device_put(jnp.asarray(demographic_table, jnp.float32), layout.replicated)
  return sharded, trainable, frozen, opt_state, table


class _StepRecord:
  """``record(done, accumulated)`` reads step ``done``'s metrics (waiting for the device),
  refuses a non-finite loss and, every ``train.log_every`` steps, writes the metrics (token
  rate and truncated tokens since the last write)."""

  def __init__(self, config, steps: int, schedule, ckpt, writer: MetricWriter, bar, last_good):
    self.config, self.steps, self.schedule = config, steps, schedule
    self.ckpt, self.writer, self.bar = ckpt, writer, bar
    self.last_good = last_good  # the newest finite checkpoint's step, or None
    self.losses: list[float] = []
    self.tokens_seen, self.t0 = 0, time.perf_counter()
    self.truncated = 0  # tokens the data pipeline cut to fit (logged when a batch counts them)

  def __call__(self, done: int, accumulated: list[dict]) -> None:
    loss = float(np.mean([float(m["loss"]) for m in accumulated]))
    grad_norms = [float(m["grad_norm"]) for m in accumulated]
    state_finite = all(bool(m["state_finite"]) for m in accumulated)
    if not (math.isfinite(loss) and all(map(math.isfinite, grad_norms)) and state_finite):
      self.ckpt.wait()
      raise NonFiniteLoss(
        f"loss {loss}, gradient norms {grad_norms}"
        + ("" if state_finite else ", updated parameters or optimiser state not finite")
        + f" at step {done}; stopping before it is saved. "
        + (
          f"The last finite checkpoint (step {self.last_good}) in {self.ckpt.directory} is intact."
          if self.last_good is not None
          else f"No checkpoint in {self.ckpt.directory} was written (none is finite)."
        )
        + " Lower the learning rate or check the data."
      )
    self.losses.append(loss)
    self.tokens_seen += sum(int(m["input_tokens"]) for m in accumulated)
    self.bar.update(1)
    self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    if done % self.config.train.log_every == 0 or done == self.steps:
      self._write(done, loss, grad_norms, accumulated)

  def _write(self, done: int, loss: float, grad_norms: list[float], accumulated) -> None:
    elapsed = time.perf_counter() - self.t0
    scalars = {
      "loss": loss,
      "task_loss": float(np.mean([float(m["task_loss"]) for m in accumulated])),
      "balance_loss": float(np.mean([float(m["balance_loss"]) for m in accumulated])),
      "grad_norm": max(grad_norms),  # Before clipping; the largest micro-batch's.
      "learning_rate": float(self.schedule(done - 1)),
      "tokens_per_second": self.tokens_seen / max(elapsed, 1e-9),  # Non-padding tokens.
      **{
        k: float(np.mean([float(m[k]) for m in accumulated]))
        for k in accumulated[0]
        if k not in _READ_METRICS
      },
    }
    usage = {
      k: np.asarray(v) / np.maximum(np.asarray(v).sum(-1, keepdims=True), 1)
      for k, v in accumulated[-1]["expert_counts"].items()
    }
    if self.truncated:
      scalars["truncated_tokens"] = self.truncated  # since the last log line
    self.writer.write(done, scalars, usage)
    self.tokens_seen, self.t0, self.truncated = 0, time.perf_counter(), 0


def progress_bar(total: int, initial: int, *, enabled: bool, stream=None) -> tqdm:
  """A redrawn bar on a terminal; elsewhere (CI, cluster logs) a line every few seconds."""
  stream = sys.stderr if stream is None else stream
  terminal = stream.isatty()
  return tqdm(
    total=total,
    initial=initial,
    disable=not enabled,
    desc="train",
    unit="step",
    file=stream if terminal else _LinePerRefresh(stream),
    mininterval=0.1 if terminal else LOG_PROGRESS_SECONDS,
    dynamic_ncols=terminal,
  )


class _LinePerRefresh:
  """Turns tqdm's carriage-return redraws into one line each."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, text: str) -> None:
    text = text.replace("\r", "").rstrip()
    if text:
      self.stream.write(text + "\n")

  def flush(self) -> None:
    self.stream.flush()


def _state(trainable, opt_state, step: int) -> dict:
  """What a training checkpoint holds besides the data iterator and the config."""
  return {"trainable": trainable, "opt_state": opt_state, "step": np.asarray(step, np.int64)}


def _optimizer_shardings(tx, trainable, trainable_sh, replicated):
  """Moments take their parameter's sharding; everything else (step counts) is replicated."""
  return optax.tree_map_params(
    tx,
    lambda _, sh: sh,
    jax.eval_shape(tx.init, trainable),
    trainable_sh,
    transform_non_params=lambda _: replicated,
  )


def _abstract(trainable, opt_state) -> dict:
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
    _state(trainable, opt_state, 0),
  )


def abstract_state(config, trainable) -> dict:
  """Shapes and shardings of a training checkpoint's state, for restoring it outside
  :func:`train` onto where ``trainable``'s arrays are (whatever mesh it was saved from)."""
  tx = optim.make_optimizer(config.optim, 1)
  shardings = jax.tree.map(lambda x: x.sharding, trainable)
  replicated = NamedSharding(jax.tree.leaves(shardings)[0].mesh, PartitionSpec())
  opt_sh = _optimizer_shardings(tx, trainable, shardings, replicated)
  opt_state = jax.tree.map(
    lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
    jax.eval_shape(tx.init, trainable),
    opt_sh,
  )
  return _abstract(trainable, opt_state)


def _device_batch(batch: dict, batch_sh, objective: Objective) -> dict:
  supervised = int(np.max(batch["loss_mask"].sum(-1)))
  if supervised > objective.max_targets:
    raise ValueError(
      f"an example supervises {supervised} tokens; this objective reads at most "
      f"{objective.max_targets} per sequence"
    )
  # Each process holds its own shard of the global batch (grain shards by process).
  return {
    k: jax.make_array_from_process_local_data(batch_sh, np.asarray(batch[k]))
    for k in objective.batch_keys
  }
