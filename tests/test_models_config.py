"""ModelConfig from a checkpoint directory's config.json: what it refuses, by name."""

import json

import pytest

from cuma_jax.models.pretrained import load_pretrained


def test_directory_without_config_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no config\.json"):
    load_pretrained(tmp_path)


def test_unsupported_model_type_lists_supported(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(ValueError, match=r"gpt2.*llama, qwen3"):
    load_pretrained(tmp_path)
