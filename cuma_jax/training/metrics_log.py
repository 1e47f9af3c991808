"""Training observability: JSONL (one object per logged step) and TensorBoard event files."""

from __future__ import annotations

import json
import os

import numpy as np

from cuma_jax.training.workdir import write_atomically


class MetricWriter:
  """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard events in ``workdir/tb``.

  Per-router expert usage ([layers, experts] fractions) goes to the JSONL file whole and to
  TensorBoard as histograms plus one load-imbalance scalar (max / mean usage) per router.
  A run resumed at ``resume_step`` replays the steps after it, so their earlier records (and
  a line cut short by a kill) are dropped first and TensorBoard is told to purge them.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # Deferred: the writer spawns a thread.

    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    _drop_records_after(self.path, resume_step)
    self._jsonl = open(self.path, "a", buffering=1)
    self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1)

  def write(
    self, step: int, scalars: dict[str, float], expert_usage: dict[str, np.ndarray] | None = None
  ) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    for key, value in scalars.items():
      self._tb.add_scalar(key, float(value), step)
    if expert_usage:
      record["expert_usage"] = {k: np.asarray(v).round(6).tolist() for k, v in expert_usage.items()}
      for router, usage in expert_usage.items():
        usage = np.asarray(usage, np.float64)
        self._tb.add_histogram(f"expert_usage/{router}", usage.reshape(-1), step)
        imbalance = usage.max(-1) / np.maximum(usage.mean(-1), 1e-12)
        self._tb.add_scalar(f"load_imbalance/{router}", float(imbalance.mean()), step)
    self._jsonl.write(json.dumps(record) + "\n")

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _drop_records_after(path: str, step: int) -> None:
  """Rewrites ``path`` without records of steps after ``step`` or torn lines."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if record["step"] <= step:
        kept.append(line.rstrip("\n") + "\n")
  write_atomically(path, "".join(kept))
