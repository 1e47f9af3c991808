"""The experiment driver: exact resumption, NaN stop, config checks, the main job on `tiny`."""

import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from cuma_jax import fingerprint, job, presets, schema
from cuma_jax.checkpoints.safetensors_io import SINGLE_FILE, TensorIndex, write_safetensors
from cuma_jax.data.pipeline import SurveyTables, make_dataset
from cuma_jax.models import pretrained as api
from cuma_jax.tiny import backbone as tiny_backbone
from cuma_jax.training import checkpointing, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  c = ml_collections.ConfigDict(presets.experiment_config("cuma", "tiny").to_dict())
  c.train.update(log_every=1, checkpoint_every=2, keep_checkpoints=5, num_steps=6)
  c.optim.update(schedule="cosine", warmup_steps=2)
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """The tiny synthetic survey and a warmed-up tiny backbone, built once."""
  workdir = str(tmp_path_factory.mktemp("assets"))
  config = _config()
  data = job.load_data(config, workdir)
  backbone = tiny_backbone.build_warmed_up(
    config, os.path.join(workdir, "assets"), data, log=lambda *_: None
  )
  return data, backbone


def _inputs(assets, backbone=None):
  """The input fingerprints of a run on ``assets`` (the tiny backbone is also the encoder)."""
  data, default = assets
  backbone = backbone or default
  return checkpointing.input_fingerprints(
    backbone=backbone, encoder=backbone, dataset=data.directory
  )


def _run(config, workdir, assets, stop_after=None, inputs=None, log=lambda *_: None):
  data, backbone = assets
  module, params = api.load_pretrained(
    backbone, adapter=schema.adapter_config(config), rng=jax.random.PRNGKey(config.seed)
  )
  tokenizer = api.load_tokenizer(backbone)
  demographics = job.make_demographics(config, backbone, SurveyTables.of(data.sources["train"]))
  dataset, tables = make_dataset(
    data.sources["train"],
    tokenizer,
    max_length=config.data.max_length,
    batch_size=config.data.batch_size,
    seed=config.data.shuffle_seed,
    num_epochs=None,
    demographic_system_prompt=config.data.demographic_system_prompt,
  )
  if stop_after is not None:
    dataset = _CrashAfter(dataset, stop_after)
  return loop.train(
    config,
    workdir,
    module,
    params,
    dataset,
    num_steps=config.train.num_steps,
    demographic_table=job.demographic_table(demographics, tables),
    inputs=inputs or _inputs(assets),
    config_conflicts=schema.resume_conflicts,  # as the job resumes
    log=log,
  )


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory):
  """Six uninterrupted steps (checkpoints at 2, 4, 6): the reference the other runs match."""
  workdir = tmp_path_factory.mktemp("straight")
  return workdir, _run(_config(), str(workdir), assets)


def _copy_of(straight, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(straight[0], workdir)
  return workdir


class _CrashAfter:
  """A dataset whose iterator dies (like a killed process) when asked for batch n + 1."""

  def __init__(self, dataset, n):
    self.dataset, self.n = dataset, n

  def __iter__(self):
    inner, n = iter(self.dataset), self.n

    class It:
      served = 0

      def __next__(self):
        if self.served == n:
          raise KeyboardInterrupt("simulated kill")
        self.served += 1
        return next(inner)

      def get_state(self):
        return inner.get_state()

      def set_state(self, state):
        inner.set_state(state)

    return It()


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a.trainable), jax.tree.leaves(b.trainable), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6, rtol=0)


def _steps(workdir):
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def test_resumption_is_exact_and_replayed_steps_are_logged_once(assets, straight, tmp_path):
  # Killed after step 5: the newest checkpoint is step 4, so step 5 runs (and is logged) twice.
  with pytest.raises(KeyboardInterrupt):
    _run(_config(), str(tmp_path), assets, stop_after=5)
  assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3, 4, 5]
  resumed = _run(_config(), str(tmp_path), assets)
  assert len(resumed.losses) == 2  # Only steps 5 and 6 ran after the restart.
  _assert_same_params(straight[1], resumed)
  full, split = _records(straight[0]), _records(tmp_path)
  assert [r["step"] for r in full] == [r["step"] for r in split] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose(
    [r["loss"] for r in split], [r["loss"] for r in full], atol=1e-6, rtol=0
  )
  assert not np.allclose(full[0]["loss"], full[-1]["loss"])  # It did learn something.


def test_checkpoint_of_another_config_is_refused(assets, straight, tmp_path):
  workdir = _copy_of(straight, tmp_path)
  other = _config(**{"adapter.rank": 4})
  with pytest.raises(checkpointing.CheckpointConfigMismatch, match=r"adapter\.rank"):
    _run(other, str(workdir), assets)


def _other_backbone(backbone, directory):
  """A copy of ``backbone`` with one weight changed: the same shapes, other contents."""
  shutil.copytree(backbone, directory)
  index = TensorIndex(directory)
  tensors = {name: np.array(index.read(name)) for name in index.names()}
  tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1.0
  write_safetensors(os.path.join(directory, SINGLE_FILE), tensors.items())
  return str(directory)


def test_resume_from_a_moved_backbone_continues(assets, straight, tmp_path):
  workdir = _copy_of(straight, tmp_path)
  moved = shutil.copytree(assets[1], tmp_path / "moved")
  resumed = _run(_config(), str(workdir), assets, inputs=_inputs(assets, str(moved)))
  assert resumed.step == 6 and resumed.losses == []


def test_unreadable_checkpoint_stops_or_falls_back(assets, straight, tmp_path):
  workdir = _copy_of(straight, tmp_path)
  # Step 6's value files truncated (as by a full disk), step 4 missing a file: the newest
  # readable step is 2.
  for root, _, files in os.walk(workdir / "checkpoints" / "6" / "state"):
    for name in files if os.path.basename(root) == "d" else ():
      os.truncate(os.path.join(root, name), os.path.getsize(os.path.join(root, name)) // 2)
  os.remove(workdir / "checkpoints" / "4" / "data" / "metadata")

  stop = _config(**{"train.on_corrupt_checkpoint": "stop"})
  with pytest.raises(checkpointing.UnreadableCheckpoint, match=r"step 6 .* unreadable") as err:
    _run(stop, str(workdir), assets)
  assert "OUT_OF_RANGE" in str(err.value) and f"mv {workdir}/checkpoints/6 " in str(err.value)
  assert _steps(workdir) == ["1", "2", "4", "6"]  # Orbax also keeps the first step.

  logs = []
  resumed = _run(_config(), str(workdir), assets, log=logs.append)
  assert any(
    re.search(r"step 6 .* unreadable .*OUT_OF_RANGE.* resuming from step 2", m) for m in logs
  )
  assert any(re.search(r"step 4 .* unreadable .*metadata.* resuming from step 2", m) for m in logs)
  assert len(resumed.losses) == 4
  _assert_same_params(straight[1], resumed)
  assert [r["step"] for r in _records(workdir)] == [1, 2, 3, 4, 5, 6]
  kept = _steps(workdir)
  assert [s for s in kept if "." not in s] == ["1", "2", "4", "6"]
  assert sorted(s.split(".")[0] for s in kept if ".unreadable-" in s) == ["4", "6"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(assets, tmp_path):
  config = _config(
    **{
      "train.num_steps": 6,
      "train.checkpoint_every": 1,
      "optim.learning_rate": 1e38,
      "optim.grad_clip": 0.0,
      "optim.schedule": "constant",
      "optim.warmup_steps": 0,
    }
  )
  with pytest.raises(loop.NonFiniteLoss, match=r"last good checkpoint \(step (\d+)\)") as err:
    _run(config, str(tmp_path), assets)
  good = int(err.value.args[0].split("(step ")[1].split(")")[0])
  ckpt = checkpointing.TrainCheckpoints.of(config, str(tmp_path / "checkpoints"))
  assert ckpt.latest_step() == good
  ckpt.close()


def test_tiny_backbone_is_rebuilt_when_its_warmup_settings_change(assets, tmp_path):
  data, backbone = assets
  assets_dir = os.path.dirname(os.path.dirname(backbone))
  logs = []
  assert tiny_backbone.build_warmed_up(_config(), assets_dir, data, logs.append) == backbone
  assert logs == [
    f"reusing the warmed-up tiny backbone in {backbone} (same data and warm-up settings)"
  ]
  other = tiny_backbone.build_warmed_up(
    _config(**{"tiny_backbone.warmup_steps": 1}), assets_dir, data, logs.append
  )
  assert other != backbone and "warm-up" in logs[-1]
  assert fingerprint.fingerprint(other) != fingerprint.fingerprint(backbone)


def test_progress_is_a_line_every_few_seconds_off_a_terminal():
  stream = io.StringIO()  # Not a terminal, like CI or a cluster log.
  bar = loop.progress_bar(60, 0, enabled=True, stream=stream)
  for _ in range(60):
    time.sleep(0.01)  # 0.6 s in all: a terminal bar would redraw several times.
    bar.update(1)
  bar.close()
  lines = stream.getvalue().split("\n")
  assert "\r" not in stream.getvalue()
  assert [line.split("|")[0] for line in lines] == ["train:   0%", "train: 100%", ""]


def test_config_validation_names_the_key():
  c = ml_collections.ConfigDict(presets.experiment_config("cuma", "tiny").to_dict())
  for key, value, message in [
    ("adapter.top_k", 9, r"top_k"),
    ("optim.schedule", "step", r"optim\.schedule.*cosine"),
    ("data.dataset", "imagenet", r"data\.dataset.*synthetic"),
    ("encoder.pooling", "max", r"encoder\.pooling.*last_token"),
  ]:
    bad = ml_collections.ConfigDict(c.to_dict())
    parent, leaf = key.split(".")
    bad[parent][leaf] = value
    with pytest.raises(ValueError, match=message):
      schema.validate(bad)
  locked = presets.experiment_config("cuma", "tiny")
  with pytest.raises(AttributeError, match="learning_rte"):
    locked.optim.learning_rte = 1.0


def test_missing_manual_directory_is_named(tmp_path):
  config = _config(**{"data.dataset": "wvb", "data.manual_dir": str(tmp_path / "nope")})
  with pytest.raises(FileNotFoundError, match=r"nope.*docs/data\.md"):
    job.load_data(config, str(tmp_path))


def _must_not_run(*args, **kwargs):
  raise AssertionError("the data were prepared before the cheap checks")


def test_eval_of_an_empty_or_mistyped_workdir_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(job, "load_data", _must_not_run)
  (tmp_path / "empty").mkdir()
  for name in ("empty", "typo"):
    with pytest.raises(FileNotFoundError, match=rf"checkpoint in .*/{name}/train/checkpoints"):
      job.run(_config(mode="eval"), str(tmp_path / name))
  assert os.listdir(tmp_path) == ["empty"] and os.listdir(tmp_path / "empty") == []


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
  """The workdir of ``python -m cuma_jax.main --config=configs/cuma.py:tiny`` (3 steps)."""
  workdir = tmp_path_factory.mktemp("main") / "run"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "cuma_jax.main",
      "--config=configs/cuma.py:tiny",
      f"--workdir={workdir}",
      "--config.train.num_steps=3",
    ],
    cwd=ROOT,
    env=dict(os.environ, XLA_FLAGS=""),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "trained: accuracy" in proc.stdout
  return workdir


def test_main_job_runs_end_to_end_on_tiny(main_job):
  workdir = main_job
  assert os.listdir(workdir / "train" / "checkpoints")
  records = [json.loads(l) for l in open(workdir / "train" / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) and "expert_usage" in r for r in records)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "train" / "tb"))
  adapters, adapter_config = checkpointing.load_adapters(str(workdir / "adapters"))
  assert adapter_config["rank"] == 8 and "layers_0" in adapters
  assert all(
    k.startswith("adapters_")
    for layer in adapters.values()
    for block in layer.values()
    for k in block
  )
  results = json.load(open(workdir / "results.json"))
  assert set(results["trained"]) == {"test", "zero_shot"}
  assert (workdir / "LOCK").read_text() == ""  # Released.


def test_changed_config_is_refused_before_loading_data(main_job, monkeypatch):
  monkeypatch.setattr(job, "load_data", _must_not_run)
  with pytest.raises(checkpointing.CheckpointConfigMismatch, match=r"adapter\.rank"):
    job.run(_config(**{"adapter.rank": 4}), str(main_job))


def test_resume_or_eval_on_another_backbone_is_refused_and_keeps_the_results(main_job, tmp_path):
  (backbone,) = glob.glob(str(main_job / "assets" / "tiny_backbone_*" / "warmed_up"))
  other = _other_backbone(backbone, tmp_path / "other")
  results = (main_job / "results.json").read_bytes()
  steps = _steps(main_job / "train")
  for mode in ("train", "eval"):
    # Train and optim keys differ from the main job's too: they may change on resume.
    config = _config(**{"mode": mode, "model.checkpoint": other})
    with pytest.raises(
      checkpointing.CheckpointInputsMismatch,
      match=r"backbone \(model\.checkpoint\): model\.safetensors changed",
    ):
      job.run(config, str(main_job), log=lambda *_: None)
  assert (main_job / "results.json").read_bytes() == results
  assert _steps(main_job / "train") == steps
