"""The prepared accelerator run (experiments/device/run.py) at tiny shapes on the CPU, so that
it cannot rot between the times an accelerator is lent: every part runs its real code and
writes its JSON and table; a part that fails is recorded and the next one still runs."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "experiments", "device", "run.py")
sys.path.insert(0, os.path.dirname(RUN))

import run as device_run  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("device") / "run"
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)  # the run sets its own, as on the device machine
  done = subprocess.run(
    [sys.executable, RUN, str(out), "--cpu-smoke"], env=env, capture_output=True, text=True
  )
  return done, out


def _read(out, part):
  return json.loads((out / f"{part}.json").read_text())


def test_every_part_runs_and_writes_its_json_and_table(smoke):
  done, out = smoke
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  summary = json.loads((out / "summary.json").read_text())
  assert [p["part"] for p in summary["parts"]] == list(device_run.PARTS)
  assert all(p["status"] == "ok" for p in summary["parts"]), summary["parts"]
  for part in device_run.PARTS:
    assert (out / f"{part}.md").read_text().startswith(f"## {part}\n")
  assert "| part | status |" in (out / "summary.md").read_text()


def test_the_measurements_are_filled_in(smoke):
  _, out = smoke
  assert _read(out, "tests")["summary"].startswith(tuple("0123456789"))  # "N/M tests collected"
  assert "collected" in _read(out, "tests")["summary"]
  rows = _read(out, "step")["rows"]
  assert set(rows) == {"LoRA r64", "CuMA dense", "CuMA ragged"}
  assert all(r["tokens_per_s"] > 0 and r["model_tflop_per_step"] > 0 for r in rows.values())
  # The CuMA steps train more than LoRA's.
  assert rows["CuMA dense"]["model_tflop_per_step"] > rows["LoRA r64"]["model_tflop_per_step"]
  sweep = _read(out, "dispatch_sweep")["by_experts"]
  assert all(v["auto_picks"] == "dense" for v in sweep.values())  # the CPU rule
  memory = _read(out, "memory")
  assert memory["predicted_total_bytes"] > 0
  assert memory["measured_peak_bytes"] is None  # XLA:CPU keeps no memory statistics
  decode = _read(out, "decode")
  assert decode["tokens_equal"] == 1.0 and decode["torch_device"] == "cpu"


def test_a_failing_part_is_recorded_and_the_next_still_runs(tmp_path, monkeypatch):
  import parts

  def broken(smoke):
    raise RuntimeError("planted")

  monkeypatch.setitem(parts.PARTS, "environment", broken)
  first = device_run.run_part("environment", str(tmp_path), True, {}, isolate=False)
  assert first["status"] == "failed"
  assert "planted" in _read(tmp_path, "environment")["error"]
  monkeypatch.setitem(parts.PARTS, "decode", lambda smoke: ({"fine": 1}, "table\n"))
  second = device_run.run_part("decode", str(tmp_path), True, {}, isolate=False)
  assert second["status"] == "ok" and _read(tmp_path, "decode")["fine"] == 1


def test_unknown_parts_and_a_used_folder_are_refused(tmp_path, capsys):
  with pytest.raises(SystemExit):
    device_run.main([str(tmp_path / "new"), "--parts", "step,bogus"])
  assert "--parts: unknown ['bogus']" in capsys.readouterr().err
  (tmp_path / "used").mkdir()
  (tmp_path / "used" / "keep.txt").write_text("kept")
  with pytest.raises(SystemExit):
    device_run.main([str(tmp_path / "used"), "--cpu-smoke"])
  assert "is not empty" in capsys.readouterr().err
  assert (tmp_path / "used" / "keep.txt").read_text() == "kept"
