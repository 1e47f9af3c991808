"""Content fingerprints."""

import os

from cuma_jax import fingerprint


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
