"""The experiment driver: exact resumption, NaN stop, config checks, the main job on `tiny`."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from cuma_jax import job, presets
from cuma_jax.data.pipeline import SurveyTables, make_dataset
from cuma_jax.models import pretrained as api
from cuma_jax.tiny import backbone as tiny_backbone
from cuma_jax.training import checkpointing, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  c = ml_collections.ConfigDict(presets.experiment_config("cuma", "tiny").to_dict())
  c.train.update(log_every=1, checkpoint_every=3, keep_checkpoints=5)
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


def _run(config, workdir, assets, stop_after=None):
  data, backbone = assets
  module, params = api.load_pretrained(
    backbone, adapter=presets.adapter_config(config), rng=jax.random.PRNGKey(config.seed)
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
    log=lambda *_: None,
  )


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


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_resumption_is_exact(assets, tmp_path):
  config = _config(**{"train.num_steps": 6})
  straight = _run(config, str(tmp_path / "straight"), assets)
  with pytest.raises(KeyboardInterrupt):
    _run(config, str(tmp_path / "resumed"), assets, stop_after=3)
  resumed = _run(config, str(tmp_path / "resumed"), assets)
  assert len(resumed.losses) == 3  # Only steps 4..6 ran after the restart.
  for a, b in zip(jax.tree.leaves(straight.trainable), jax.tree.leaves(resumed.trainable)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
  full, split = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
  assert sorted(full) == sorted(split) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose(
    [split[s] for s in range(1, 7)], [full[s] for s in range(1, 7)], atol=1e-6, rtol=0
  )
  assert not np.allclose(full[1], full[6])  # It did learn something.


def test_checkpoint_of_another_config_is_refused(assets, tmp_path):
  _run(_config(**{"train.num_steps": 1}), str(tmp_path), assets)
  other = _config(**{"train.num_steps": 1, "adapter.rank": 4})
  with pytest.raises(checkpointing.CheckpointConfigMismatch, match=r"adapter\.rank"):
    _run(other, str(tmp_path), assets)


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
  ckpt = checkpointing.TrainCheckpoints(
    str(tmp_path / "checkpoints"),
    save_every=1,
    keep=5,
    config_json=checkpointing.config_to_json(config),
  )
  assert ckpt.latest_step() == good
  ckpt.close()


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
      presets.validate(bad)
  locked = presets.experiment_config("cuma", "tiny")
  with pytest.raises(AttributeError, match="learning_rte"):
    locked.optim.learning_rte = 1.0


def test_missing_manual_directory_is_named(tmp_path):
  config = _config(**{"data.dataset": "wvb", "data.manual_dir": str(tmp_path / "nope")})
  with pytest.raises(FileNotFoundError, match="nope"):
    job.load_data(config, str(tmp_path))


def test_main_job_runs_end_to_end_on_tiny(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, XLA_FLAGS="")
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
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "trained: accuracy" in proc.stdout
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
