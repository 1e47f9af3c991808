"""One writer per workdir, and files that are either whole or absent.

Two runs writing one workdir interleave ``metrics.jsonl`` and race on checkpoints, so a run
holds an exclusive lock on ``WORKDIR/LOCK`` from before it writes anything until it ends. The
lock is an OS file lock (``flock``): it goes away with its process however the process dies, so
a killed run never blocks the next one. The file itself records the holder's pid, host and
start time (for the refusal message) and is emptied on a clean exit, so a record found by a run
that gets the lock is the trace of a run that died holding it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import TextIO

from cuma_jax.errors import Refusal

LOCK_FILE = "LOCK"


class WorkdirBusy(Refusal, RuntimeError):
  pass


class WorkdirUnusable(Refusal, ValueError):
  """The workdir (or its lock) is not something a run can write to; the message says why."""


def check_workdir_path(workdir: str) -> None:
  """Refuses a workdir that is (or lies under) something other than a directory."""
  path = os.path.abspath(workdir)
  while not os.path.isdir(path):
    if os.path.lexists(path):
      raise WorkdirUnusable(
        f"--workdir {workdir}: {path} is a file, not a directory; give a directory (new, or "
        "an earlier run's) or move the file away"
      )
    path = os.path.dirname(path)


class WorkdirLock:
  """``with WorkdirLock(workdir):`` refuses to start while another process writes there.

  ``enabled=False`` (the non-primary processes of a multi-host run) holds nothing.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, log=print):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.enabled, self.log = enabled, log
    self._file: TextIO | None = None

  def __enter__(self) -> WorkdirLock:
    if not self.enabled:
      return self
    check_workdir_path(os.path.dirname(self.path))
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    if os.path.isdir(self.path):
      raise WorkdirUnusable(
        f"the workdir lock {self.path} is a directory; it must be a file: remove it "
        f"(rmdir {self.path}) and rerun"
      )
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_record(f)
      f.close()
      raise WorkdirBusy(
        f"{os.path.dirname(self.path)} is in use by {_describe(holder)}; wait for that run to "
        "end or use another --workdir"
      ) from None
    except OSError as e:
      f.close()
      raise WorkdirUnusable(
        f"cannot lock {self.path}: its filesystem does not support flock ({e.strerror}); "
        "use a --workdir on a local disk (or a network filesystem with locking)"
      ) from None
    previous = _read_record(f)
    if previous:
      self.log(f"recovered the workdir lock left by {_describe(previous)}, which is gone")
    f.seek(0)
    f.truncate()
    f.write(
      json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.ctime()}) + "\n"
    )
    f.flush()
    os.fsync(f.fileno())
    self._file = f
    return self

  def __exit__(self, *exc) -> None:
    if self._file is not None:
      self._file.truncate(0)
      self._file.close()  # Releases the flock.
      self._file = None


def _read_record(f) -> dict | None:
  """The holder's record; None while it is empty or half-written (a holder just starting)."""
  f.seek(0)
  try:
    return json.loads(f.read())
  except ValueError:
    return None


def _describe(holder: dict | None) -> str:
  if holder is None:
    return "another process (which has not written its pid yet)"
  return f"pid {holder['pid']} on host {holder['host']} (since {holder['since']})"


def write_atomically(path: str, text: str) -> None:
  """Writes ``path`` so that it is never seen half-written (a kill leaves the old file)."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
