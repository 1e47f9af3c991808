"""Safetensors checkpoints: a directory without one, and a missing shard, are named."""

import json
import shutil

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
