"""Safetensors checkpoints: a directory without one, a missing shard and a corrupt file are
named."""

import json
import os
import shutil
import struct

import pytest

from cuma_jax.models.pretrained import load_pretrained


def test_directory_without_safetensors_is_named(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
  with pytest.raises(FileNotFoundError, match=r"not a safetensors checkpoint"):
    load_pretrained(tmp_path)


def test_missing_shard_is_named(tiny_checkpoint, tmp_path):
  path = shutil.copytree(tiny_checkpoint("qwen3")[0], tmp_path / "ckpt")
  (path / "model.safetensors.index.json").write_text(
    json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})
  )
  with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors"):
    load_pretrained(path)


@pytest.mark.parametrize(
  "damage",
  [
    lambda path: os.truncate(path, os.path.getsize(path) - 100),
    lambda path: os.truncate(path, 5),
    lambda path: _overwrite(path, 0, struct.pack("<Q", 1 << 62)),
    lambda path: _overwrite(path, 8, b"[1, 2]"),
  ],
  ids=["truncated_data", "truncated_prefix", "absurd_header_length", "header_not_an_index"],
)
def test_corrupt_safetensors_file_is_named(tiny_checkpoint, tmp_path, damage):
  path = shutil.copytree(tiny_checkpoint("qwen3")[0], tmp_path / "ckpt")
  damage(path / "model.safetensors")
  with pytest.raises(ValueError, match=rf"{path}/model\.safetensors is corrupt"):
    load_pretrained(path)


def _overwrite(path, offset, data):
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(data)
