"""The experiment's data stage: a missing WorldValuesBench directory is named."""

from helpers import tiny_config
import pytest

from cuma_jax import job


def test_missing_manual_directory_is_named(tmp_path):
  config = tiny_config(**{"data.dataset": "wvb", "data.manual_dir": str(tmp_path / "nope")})
  with pytest.raises(FileNotFoundError, match="nope"):
    job.load_data(config, str(tmp_path))
