"""One writer per workdir, files never seen half-written, content fingerprints."""

import errno
import fcntl
import os
import re
import shutil
import socket
import subprocess
import sys

import ml_collections
import pytest

from cuma_jax import fingerprint, presets
from cuma_jax.tasks import survey
from cuma_jax.training.workdir import (
  WorkdirBusy,
  WorkdirLock,
  WorkdirUnusable,
  write_atomically,
)

# Another process that takes a workdir's lock and holds it until killed.
_HOLDER = """
import sys
from cuma_jax.training.workdir import WorkdirLock
lock = WorkdirLock(sys.argv[1]).__enter__()
print("held", flush=True)
sys.stdin.read()
"""


def _must_not_run(*args, **kwargs):
  raise AssertionError("the data were prepared before the workdir was locked")


def test_second_writer_is_refused_and_a_dead_holders_lock_recovered(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  holder = subprocess.Popen(
    [sys.executable, "-c", _HOLDER, str(workdir)],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline() == "held\n"
    monkeypatch.setattr(survey.TASK, "load_data", _must_not_run)
    config = ml_collections.ConfigDict(presets.experiment_config("cuma", "tiny").to_dict())
    busy = rf"in use by pid {holder.pid} on host {re.escape(socket.gethostname())}"
    with pytest.raises(WorkdirBusy, match=busy):
      survey.run(config, str(workdir))
    assert os.listdir(workdir) == ["LOCK"]
  finally:
    holder.kill()
    holder.wait()
  logs = []
  with WorkdirLock(str(workdir), log=logs.append):
    pass
  recovered = f"recovered the workdir lock left by pid {holder.pid} on host {socket.gethostname()}"
  assert len(logs) == 1 and logs[0].startswith(recovered)
  with WorkdirLock(str(workdir), log=logs.append):
    pass
  assert len(logs) == 1  # A clean exit leaves nothing to recover.


def test_unusable_workdir_or_lock_is_named_in_one_line(tmp_path, monkeypatch):
  monkeypatch.setattr(survey.TASK, "load_data", _must_not_run)
  config = ml_collections.ConfigDict(presets.experiment_config("cuma", "tiny").to_dict())
  # A workdir that is a regular file (was FileExistsError), or lies under one.
  afile = tmp_path / "results"
  afile.write_text("kept")
  for workdir in (afile, afile / "run"):
    with pytest.raises(WorkdirUnusable, match=rf"{afile} is a file, not a directory"):
      survey.run(config, str(workdir))
  assert afile.read_text() == "kept"
  # A LOCK that is a directory (was IsADirectoryError).
  (tmp_path / "run" / "LOCK").mkdir(parents=True)
  with pytest.raises(WorkdirUnusable, match=r"LOCK is a directory; .*rmdir"):
    survey.run(config, str(tmp_path / "run"))
  assert os.listdir(tmp_path / "run") == ["LOCK"]

  # A filesystem without flock (was a raw OSError).
  def no_flock(*_):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

  monkeypatch.setattr(fcntl, "flock", no_flock)
  with pytest.raises(WorkdirUnusable, match=r"does not support flock \(No locks available\)"):
    survey.run(config, str(tmp_path / "other"))


def test_write_atomically_keeps_the_old_file_when_writing_fails(tmp_path):
  path = tmp_path / "results.json"
  write_atomically(str(path), "old")
  with pytest.raises(UnicodeEncodeError):
    write_atomically(str(path), "new \ud800")  # Not encodable: fails while writing.
  assert path.read_text() == "old"
  assert os.listdir(tmp_path) == ["results.json"]


def test_fingerprint_follows_contents_not_location(tmp_path, monkeypatch):
  # Small limits so that the 4 KiB file is fingerprinted by samples, as weights are.
  monkeypatch.setattr(fingerprint, "FULL_HASH_BYTES", 1024)
  monkeypatch.setattr(fingerprint, "HEAD_BYTES", 256)
  monkeypatch.setattr(fingerprint, "SAMPLE_BYTES", 16)
  a = tmp_path / "a"
  (a / "sub").mkdir(parents=True)
  (a / "config.json").write_text('{"hidden_size": 32}')
  (a / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 16)
  (a / ".cache").write_text("ignored")
  saved = fingerprint.fingerprint(a)
  assert sorted(saved) == ["config.json", "sub/weights.bin"]
  os.rename(a, tmp_path / "b")
  assert fingerprint.fingerprint(tmp_path / "b") == saved
  (tmp_path / "b" / "config.json").write_text('{"hidden_size": 64}')
  with open(tmp_path / "b" / "sub" / "weights.bin", "r+b") as f:
    f.seek(256)  # The first sampled byte after the head.
    f.write(b"\xff")
  (tmp_path / "b" / "tokenizer.json").write_text("{}")
  os.remove(tmp_path / "b" / ".cache")
  assert fingerprint.differences(saved, fingerprint.fingerprint(tmp_path / "b")) == [
    "config.json changed",
    "sub/weights.bin changed",
    "tokenizer.json is new",
  ]


def test_a_change_between_the_samples_of_a_large_file_is_seen(tmp_path, monkeypatch):
  monkeypatch.setattr(fingerprint, "FULL_HASH_BYTES", 1024)
  monkeypatch.setattr(fingerprint, "HEAD_BYTES", 256)
  monkeypatch.setattr(fingerprint, "SAMPLE_BYTES", 16)
  weights = tmp_path / "a" / "weights.bin"
  weights.parent.mkdir()
  weights.write_bytes(bytes(range(256)) * 16)
  os.utime(weights, ns=(10**18, 10**18))  # written long ago
  saved = fingerprint.fingerprint(weights.parent)

  # A byte between the samples rewritten in place: same size, same samples (was accepted).
  def overwrite(path):
    with open(path, "r+b") as f:
      f.seek(300)
      f.write(b"\xff")

  overwrite(weights)
  assert fingerprint.differences(saved, fingerprint.fingerprint(weights.parent)) == [
    "weights.bin changed (same size and sampled bytes, another modification time: set "
    "CUMA_FULL_DIGESTS=1 to compare whole contents)"
  ]
  # A copy that keeps the times (cp -p, a move) is the same; one that does not is not, unless
  # whole digests are compared.
  weights.write_bytes(bytes(range(256)) * 16)
  os.utime(weights, ns=(10**18, 10**18))
  shutil.copytree(weights.parent, tmp_path / "kept")
  (tmp_path / "fresh").mkdir()
  shutil.copyfile(weights, tmp_path / "fresh" / "weights.bin")
  assert fingerprint.differences(saved, fingerprint.fingerprint(tmp_path / "kept")) == []
  assert fingerprint.differences(saved, fingerprint.fingerprint(tmp_path / "fresh")) != []
  monkeypatch.setenv("CUMA_FULL_DIGESTS", "1")
  saved = fingerprint.fingerprint(weights.parent)
  assert fingerprint.differences(saved, fingerprint.fingerprint(tmp_path / "fresh")) == []
  overwrite(tmp_path / "fresh" / "weights.bin")
  os.utime(tmp_path / "fresh" / "weights.bin", ns=(10**18, 10**18))  # even with the old time
  assert fingerprint.differences(saved, fingerprint.fingerprint(tmp_path / "fresh")) == [
    "weights.bin changed"
  ]
