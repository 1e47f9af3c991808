"""The experiment driver: cheap checks before anything is prepared, a missing WorldValuesBench
directory named, and a workdir refused to another config or backbone without losing results."""

import glob
import hashlib
import json
import os
import shutil

from helpers import other_backbone, tiny_config
import pytest

from cuma_jax.tasks import survey
from cuma_jax.training import checkpointing

pytestmark = pytest.mark.slow


def test_missing_manual_directory_is_named(tmp_path):
  config = tiny_config(**{"data.dataset": "wvb", "data.manual_dir": str(tmp_path / "nope")})
  with pytest.raises(FileNotFoundError, match=r"nope.*docs/data\.md"):
    survey.load_data(config, str(tmp_path))


def _must_not_run(*args, **kwargs):
  raise AssertionError("the data were prepared before the cheap checks")


def test_eval_of_an_empty_or_mistyped_workdir_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(survey.TASK, "load_data", _must_not_run)
  (tmp_path / "empty").mkdir()
  for name in ("empty", "typo"):
    with pytest.raises(FileNotFoundError, match=rf"checkpoint in .*/{name}/train/checkpoints"):
      survey.run(tiny_config(mode="eval"), str(tmp_path / name))
  assert os.listdir(tmp_path) == ["empty"] and os.listdir(tmp_path / "empty") == []


def test_changed_config_is_refused_before_loading_data(main_job, monkeypatch):
  monkeypatch.setattr(survey.TASK, "load_data", _must_not_run)
  _, workdir = main_job
  with pytest.raises(checkpointing.CheckpointConfigMismatch, match=r"adapter\.rank"):
    survey.run(tiny_config(**{"adapter.rank": 4}), str(workdir))


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
      survey.run(config, str(workdir), log=lambda *_: None)
  assert (workdir / "results.json").read_bytes() == results
  assert sorted(os.listdir(workdir / "train" / "checkpoints")) == steps


def _sha256(path):
  return hashlib.sha256(path.read_bytes()).hexdigest()


def test_eval_repairs_the_exports_and_merges_into_the_results(main_job, tmp_path):
  _, main = main_job
  workdir = tmp_path / "run"
  shutil.copytree(main, workdir)
  exports = {
    "trained": workdir / "adapters" / "adapters.safetensors",
    "lora": workdir / "baselines" / "lora" / "adapters" / "adapters.safetensors",
  }
  originals = {name: path.read_bytes() for name, path in exports.items()}
  before = json.loads((workdir / "results.json").read_text())
  assert before["exports"]["adapters/adapters.safetensors"] == _sha256(exports["trained"])
  for path in exports.values():
    os.truncate(path, 100)  # was kept as it is, the run exiting 0
  before["references"] = {"kept": 1}  # something this evaluation does not compute
  (workdir / "results.json").write_text(json.dumps(before))

  logs = []
  config = tiny_config(mode="eval", **{"train.num_steps": 3, "eval.baselines": ("lora",)})
  survey.run(config, str(workdir), log=logs.append)
  for name, path in exports.items():
    assert path.read_bytes() == originals[name]  # rewritten from the checkpoint, exactly
    assert any(f"{path} is not the checkpoint's export" in m for m in logs)
  # Evaluated without baselines: it updates what it evaluated and keeps the rest.
  survey.run(tiny_config(mode="eval", **{"train.num_steps": 3, "eval.baselines": ()}), str(workdir))
  after = json.loads((workdir / "results.json").read_text())
  assert after["baselines"] == before["baselines"] and after["references"] == {"kept": 1}
  assert after["trained"] == before["trained"] and after["run"] == before["run"]
  assert after["eval_run"]["config"]["mode"] == "eval"
  assert after["exports"]["adapters/adapters.safetensors"] == _sha256(exports["trained"])
  lora = json.loads((workdir / "baselines" / "lora" / "results.json").read_text())
  assert lora["exports"]["adapters/adapters.safetensors"] == _sha256(exports["lora"])
