"""Training observability: JSONL (one object per logged step) and TensorBoard event files."""

from __future__ import annotations

import glob
import json
import os
import struct
import time

import numpy as np

from cuma_jax.training.workdir import write_atomically


class MetricWriter:
  """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard events in ``workdir/tb``.

  Per-router expert usage ([layers, experts] fractions) goes to the JSONL file whole and to
  TensorBoard as histograms plus one load-imbalance scalar (max / mean usage) per router.
  A run resumed at ``resume_step`` replays the steps after it, so their earlier records are
  dropped first and TensorBoard is told to purge them. A line or event record cut short by
  a kill is dropped with a warning, and logged steps (every ``log_every``) missing before
  ``resume_step`` are named (``log``, a ``missing_steps`` record and a TensorBoard text).
  Each line is one ``write`` to a file opened for appending, so a kill tears the last only.
  """

  def __init__(
    self, workdir: str, enabled: bool = True, resume_step: int = 0, log_every: int = 1, log=print
  ):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # Deferred: the writer spawns a thread.

    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    last = _drop_records_after(self.path, resume_step, log)
    for events in sorted(glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))):
      _drop_torn_event(events, log)
    self._jsonl = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    # tensorboardX names its file by the second: a resume within one would overwrite it.
    self._tb = SummaryWriter(
      os.path.join(workdir, "tb"), purge_step=resume_step + 1, filename_suffix=f".{time.time_ns()}"
    )
    first_missing = (last // log_every + 1) * log_every
    if resume_step and first_missing <= resume_step:
      missing = f"{last + 1}-{resume_step}"
      log(
        f"warning: {self.path} and {workdir}/tb have no records of steps {missing} (lost "
        f"before this resume from step {resume_step}; those steps are not run again)"
      )
      self._append({"step": resume_step, "missing_steps": [last + 1, resume_step]})
      self._tb.add_text("missing_steps", f"no records of steps {missing}", resume_step)

  def write(
    self, step: int, scalars: dict[str, float], expert_usage: dict[str, np.ndarray] | None = None
  ) -> None:
    if not self.enabled:
      return
    # One JSON line: the step, the scalars and (when given) each router's expert usage.
    record: dict[str, object] = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    for key, value in scalars.items():
      self._tb.add_scalar(key, float(value), step)
    if expert_usage:
      record["expert_usage"] = {k: np.asarray(v).round(6).tolist() for k, v in expert_usage.items()}
      for router, usage in expert_usage.items():
        usage = np.asarray(usage, np.float64)
        self._tb.add_histogram(f"expert_usage/{router}", usage.reshape(-1), step)
        imbalance = usage.max(-1) / np.maximum(usage.mean(-1), 1e-12)
        self._tb.add_scalar(f"load_imbalance/{router}", float(imbalance.mean()), step)
    self._append(record)

  def _append(self, record: dict) -> None:
    data = (json.dumps(record) + "\n").encode()
    while data:
      data = data[os.write(self._jsonl, data) :]

  def close(self) -> None:
    if self.enabled:
      os.close(self._jsonl)
      self._tb.close()


def _drop_records_after(path: str, step: int, log) -> int:
  """Rewrites ``path`` without records of steps after ``step`` or torn lines (named in a
  warning); returns the last step it keeps a record of (0 if none)."""
  if not os.path.exists(path):
    return 0
  kept, torn, last = [], [], 0
  with open(path) as f:
    for number, line in enumerate(f, 1):
      try:
        record = json.loads(line)
      except ValueError:
        torn.append(number)
        continue
      if record["step"] <= step:
        kept.append(line.rstrip("\n") + "\n")
        last = max(last, record["step"])
  if torn:
    log(f"warning: dropped the torn line(s) {torn} of {path} (cut short by a kill)")
  write_atomically(path, "".join(kept))
  return last


def _drop_torn_event(path: str, log) -> None:
  """Truncates a TensorBoard event file after its last whole record (a record is a uint64
  length, a 4-byte CRC, the data and a 4-byte CRC)."""
  size, end = os.path.getsize(path), 0
  with open(path, "rb") as f:
    while end + 12 <= size:
      f.seek(end)
      (length,) = struct.unpack("<Q", f.read(8))
      if end + 16 + length > size:
        break
      end += 16 + length
  if end != size:
    log(f"warning: dropped the torn last {size - end} bytes of {path} (cut short by a kill)")
    os.truncate(path, end)
