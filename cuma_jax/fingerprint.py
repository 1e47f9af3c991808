"""Content fingerprints of the files a run depends on, independent of where they live.

A fingerprint maps each file's path, relative to the fingerprinted directory, to a string:
``size:sha256`` of its whole contents for files up to ``FULL_HASH_BYTES`` (configs,
tokenizers, survey TSVs, prepared data shards). A larger file (model weights) is read in part,
which keeps fingerprinting a 16 GB checkpoint instant: ``size:sampled:mtime`` holds a SHA-256
of its first MiB (a safetensors file's tensor index) and evenly spaced samples, and its
modification time, so that a change between the samples (which rewrites the file) is still
seen. A copy with a new modification time is then refused as changed, unless whole digests
are on: with ``CUMA_FULL_DIGESTS=1`` in the environment a large file's entry also holds the
SHA-256 of all of it (``size:sampled:mtime:full``), and two entries that both have one are
compared by it alone. A directory moved (or copied keeping times, ``cp -p``) keeps its
fingerprint; hidden files (caches, locks) are left out.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

FULL_HASH_BYTES = 64 << 20
HEAD_BYTES = 1 << 20
SAMPLES = 16
SAMPLE_BYTES = 64 << 10
# Set to "1": large files' entries also hold the digest of their whole contents.
FULL_DIGESTS_ENV = "CUMA_FULL_DIGESTS"


def fingerprint(path: str | os.PathLike) -> dict[str, str]:
  """{relative file name: "size:sha256"} of a file or of every file under a directory."""
  root = Path(path)
  if root.is_file():
    return {root.name: _file_digest(root)}
  if not root.is_dir():
    raise FileNotFoundError(f"{root} does not exist")
  files = sorted(
    p
    for p in root.rglob("*")
    if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
  )
  return {p.relative_to(root).as_posix(): _file_digest(p) for p in files}


def digest(value) -> str:
  """A short hex key of any JSON-serialisable value (a fingerprint, settings)."""
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def same_file(saved: str, current: str) -> bool:
  """Whether two entries of a file are of the same contents (see the module's rule)."""
  a, b = saved.split(":"), current.split(":")
  if a[:2] != b[:2]:  # size and (whole or sampled) digest
    return False
  if len(a) < 3 or len(b) < 3:  # small files; large ones recorded before times were
    return True
  if len(a) == len(b) == 4:
    return a[3] == b[3]
  return a[2] == b[2]


def _only_times_differ(saved: str, current: str) -> bool:
  a, b = saved.split(":"), current.split(":")
  return a[:2] == b[:2] and not len(a) == len(b) == 4


def differences(saved: dict[str, str], current: dict[str, str]) -> list[str]:
  """What changed between two fingerprints, one phrase per file."""
  both = sorted(saved.keys() & current.keys())
  changed = [
    f"{name} changed"
    + (
      " (same size and sampled bytes, another modification time: set CUMA_FULL_DIGESTS=1 "
      "to compare whole contents)"
      if _only_times_differ(saved[name], current[name])
      else ""
    )
    for name in both
    if not same_file(saved[name], current[name])
  ]
  removed = [f"{name} is gone" for name in sorted(saved.keys() - current.keys())]
  added = [f"{name} is new" for name in sorted(current.keys() - saved.keys())]
  return changed + removed + added


def _file_digest(path: Path) -> str:
  stat = path.stat()
  size = stat.st_size
  if size <= FULL_HASH_BYTES:
    return f"{size}:{full_digest(path)}"
  h = hashlib.sha256()
  with open(path, "rb") as f:
    h.update(f.read(HEAD_BYTES))
    span = size - HEAD_BYTES - SAMPLE_BYTES
    for i in range(SAMPLES):
      f.seek(HEAD_BYTES + i * span // (SAMPLES - 1))
      h.update(f.read(SAMPLE_BYTES))
  entry = f"{size}:{h.hexdigest()}:{stat.st_mtime_ns}"
  if os.environ.get(FULL_DIGESTS_ENV) == "1":
    entry += f":{full_digest(path)}"
  return entry


def full_digest(path: str | os.PathLike) -> str:
  """SHA-256 of a whole file."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()
