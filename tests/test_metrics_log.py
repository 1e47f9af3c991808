"""The training log after a kill: torn lines and event records dropped, missing steps named."""

import json
import os
import pathlib
import struct

from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2

from cuma_jax.training.metrics_log import MetricWriter


def _masked(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _events(directory):
  """(step, tag) of every record of every event file, each record's CRCs checked (TFRecord)."""
  found = []
  for name in sorted(os.listdir(directory)):
    blob = pathlib.Path(directory, name).read_bytes()
    pos = 0
    while pos < len(blob):
      header = blob[pos : pos + 8]
      assert struct.unpack("<I", blob[pos + 8 : pos + 12])[0] == _masked(header)
      (length,) = struct.unpack("<Q", header)
      data = blob[pos + 12 : pos + 12 + length]
      assert struct.unpack("<I", blob[pos + 12 + length : pos + 16 + length])[0] == _masked(data)
      event = event_pb2.Event.FromString(data)
      found += [(event.step, v.tag) for v in event.summary.value]
      pos += 16 + length
  return found


def _log(workdir, steps, resume_step=0):
  writer = MetricWriter(str(workdir), resume_step=resume_step, log=print)
  for step in steps:
    writer.write(step, {"loss": 1.0 / step})
  writer.close()


def test_torn_log_is_repaired_and_missing_steps_are_named(tmp_path):
  # Steps 1-3 logged, then a kill tears step 3's line and the last event record; the newest
  # checkpoint is step 6 (the log lost steps 3-6, as by a disk restored from a backup).
  _log(tmp_path, [1, 2, 3])
  path = tmp_path / "metrics.jsonl"
  text = path.read_text()
  path.write_text(text[: text.index('{"step": 3') + 9])
  (events,) = os.listdir(tmp_path / "tb")
  os.truncate(tmp_path / "tb" / events, os.path.getsize(tmp_path / "tb" / events) - 5)

  logs = []
  writer = MetricWriter(str(tmp_path), resume_step=6, log=logs.append)
  for step in (7, 8):
    writer.write(step, {"loss": 1.0 / step})
  writer.close()

  assert any("torn line(s) [3]" in m for m in logs)
  assert any("torn last" in m and events in m for m in logs)
  assert any("no records of steps 3-6" in m for m in logs)
  records = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 6, 7, 8]  # nothing written before is lost
  assert records[2] == {"step": 6, "missing_steps": [3, 6]}
  assert [r["loss"] for r in records if "loss" in r] == [1.0, 0.5, 1 / 7, 1 / 8]
  scalars = [(step, tag) for step, tag in _events(tmp_path / "tb") if tag == "loss"]
  assert scalars == [(1, "loss"), (2, "loss"), (7, "loss"), (8, "loss")]
  assert (6, "missing_steps/text_summary") in _events(tmp_path / "tb")

  # A resume with nothing lost says nothing.
  logs.clear()
  MetricWriter(str(tmp_path), resume_step=8, log=logs.append).close()
  assert logs == []
