"""Content fingerprints of the files a run depends on, independent of where they live.

A fingerprint maps each file's path, relative to the fingerprinted directory, to its size and
a SHA-256 of its contents: all of them for files up to ``FULL_HASH_BYTES`` (configs,
tokenizers, survey TSVs, prepared data shards) and, for larger files (model weights), the
first MiB (a safetensors file's tensor index) plus evenly spaced samples. A few MiB per file
keep fingerprinting a 16 GB checkpoint instant, while two checkpoints of one shape still differ
in their sampled weights. A directory moved or copied elsewhere keeps its fingerprint; hidden
files (caches, locks) are left out.
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


def differences(saved: dict[str, str], current: dict[str, str]) -> list[str]:
  """What changed between two fingerprints, one phrase per file."""
  both = sorted(saved.keys() & current.keys())
  changed = [f"{name} changed" for name in both if saved[name] != current[name]]
  removed = [f"{name} is gone" for name in sorted(saved.keys() - current.keys())]
  added = [f"{name} is new" for name in sorted(current.keys() - saved.keys())]
  return changed + removed + added


def _file_digest(path: Path) -> str:
  size = path.stat().st_size
  h = hashlib.sha256()
  with open(path, "rb") as f:
    if size <= FULL_HASH_BYTES:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    else:
      h.update(f.read(HEAD_BYTES))
      span = size - HEAD_BYTES - SAMPLE_BYTES
      for i in range(SAMPLES):
        f.seek(HEAD_BYTES + i * span // (SAMPLES - 1))
        h.update(f.read(SAMPLE_BYTES))
  return f"{size}:{h.hexdigest()}"
