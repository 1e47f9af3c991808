"""The training loop on the tiny survey: exact resumption, NaN stop, another config refused."""

import json
import os
import shutil

from helpers import tiny_config
import jax
import numpy as np
import pytest

from cuma_jax import job, presets
from cuma_jax.data.pipeline import SurveyTables, make_dataset
from cuma_jax.models import pretrained as api
from cuma_jax.tiny import backbone as tiny_backbone
from cuma_jax.training import checkpointing, loop


def _config(**overrides):
  """The `tiny` config with adapters on q_proj and v_proj only (half the tracing and
  compile time of all seven projections; the main job trains all seven)."""
  return tiny_config(**{"adapter.targets": ("q_proj", "v_proj"), **overrides})


@pytest.fixture(scope="module")
def assets(main_job):
  """The tiny synthetic survey and the warmed-up tiny backbone of the main job's run.

  Both are in its workdir, written as `job.run` writes them (built here if that run failed
  before writing them).
  """
  _, workdir = main_job
  config = tiny_config()
  data = job.load_data(config, str(workdir))
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


SIX_STEPS = {"train.num_steps": 6}


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory):
  """Six uninterrupted steps: (its TrainResult, its workdir), read-only for the tests."""
  workdir = tmp_path_factory.mktemp("straight")
  return _run(_config(**SIX_STEPS), str(workdir), assets), workdir


def test_resumption_is_exact(assets, straight, tmp_path):
  config = _config(**SIX_STEPS)
  straight, straight_dir = straight
  with pytest.raises(KeyboardInterrupt):
    _run(config, str(tmp_path / "resumed"), assets, stop_after=3)
  resumed = _run(config, str(tmp_path / "resumed"), assets)
  assert len(resumed.losses) == 3  # Only steps 4..6 ran after the restart.
  for a, b in zip(jax.tree.leaves(straight.trainable), jax.tree.leaves(resumed.trainable)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
  full, split = _losses(straight_dir), _losses(tmp_path / "resumed")
  assert sorted(full) == sorted(split) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose(
    [split[s] for s in range(1, 7)], [full[s] for s in range(1, 7)], atol=1e-6, rtol=0
  )
  assert not np.allclose(full[1], full[6])  # It did learn something.


def test_checkpoint_of_another_config_is_refused(assets, straight, tmp_path):
  shutil.copytree(straight[1], tmp_path, dirs_exist_ok=True)  # A workdir with checkpoints.
  other = _config(**SIX_STEPS, **{"adapter.rank": 4})
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
