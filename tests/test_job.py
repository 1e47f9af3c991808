"""The experiment driver: cheap checks before anything is prepared, a missing WorldValuesBench
directory named, and a workdir refused to another config or backbone without losing results."""

import glob
import os

from helpers import other_backbone, tiny_config
import pytest

from cuma_jax import job
from cuma_jax.training import checkpointing


def test_missing_manual_directory_is_named(tmp_path):
  config = tiny_config(**{"data.dataset": "wvb", "data.manual_dir": str(tmp_path / "nope")})
  with pytest.raises(FileNotFoundError, match=r"nope.*docs/data\.md"):
    job.load_data(config, str(tmp_path))


def _must_not_run(*args, **kwargs):
  raise AssertionError("the data were prepared before the cheap checks")


def test_eval_of_an_empty_or_mistyped_workdir_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(job, "load_data", _must_not_run)
  (tmp_path / "empty").mkdir()
  for name in ("empty", "typo"):
    with pytest.raises(FileNotFoundError, match=rf"checkpoint in .*/{name}/train/checkpoints"):
      job.run(tiny_config(mode="eval"), str(tmp_path / name))
  assert os.listdir(tmp_path) == ["empty"] and os.listdir(tmp_path / "empty") == []


def test_changed_config_is_refused_before_loading_data(main_job, monkeypatch):
  monkeypatch.setattr(job, "load_data", _must_not_run)
  _, workdir = main_job
  with pytest.raises(checkpointing.CheckpointConfigMismatch, match=r"adapter\.rank"):
    job.run(tiny_config(**{"adapter.rank": 4}), str(workdir))


def test_resume_or_eval_on_another_backbone_is_refused_and_keeps_the_results(main_job, tmp_path):
  _, workdir = main_job
  (backbone,) = glob.glob(str(workdir / "assets" / "tiny_backbone_*" / "warmed_up"))
  other = other_backbone(backbone, tmp_path / "other")
  results = (workdir / "results.json").read_bytes()
  steps = sorted(os.listdir(workdir / "train" / "checkpoints"))
  for mode in ("train", "eval"):
    # Train and optim keys differ from the main job's too: they may change on resume.
    config = tiny_config(**{"mode": mode, "model.checkpoint": other})
    with pytest.raises(
      checkpointing.CheckpointInputsMismatch,
      match=r"backbone \(model\.checkpoint\): model\.safetensors changed",
    ):
      job.run(config, str(workdir), log=lambda *_: None)
  assert (workdir / "results.json").read_bytes() == results
  assert sorted(os.listdir(workdir / "train" / "checkpoints")) == steps
