"""The training loop on the tiny survey: exact resumption, NaN stop, another config refused."""

import io
import json
import os
import re
import shutil
import time

from helpers import main_job_inputs, tiny_config, train_on_survey
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cuma_jax import fingerprint, runtime, schema
from cuma_jax.tasks import survey
from cuma_jax.training import checkpointing, loop

pytestmark = pytest.mark.slow


def _config(**overrides):
  """The `tiny` config with adapters on q_proj and v_proj only (half the tracing and
  compile time of all seven projections; the main job trains all seven), six steps with
  checkpoints at 2, 4 and 6."""
  return schema.validate(
    tiny_config(
      **{
        "adapter.targets": ("q_proj", "v_proj"),
        "train.num_steps": 6,
        "train.checkpoint_every": 2,
        **overrides,
      }
    )
  )


@pytest.fixture(scope="module")
def assets(main_job):
  """The tiny synthetic survey and the warmed-up tiny backbone of the main job's run.

  Both are in its workdir, written as `cuma_jax.run` writes them (built here if that run failed
  before writing them).
  """
  _, workdir = main_job
  return main_job_inputs(workdir)


def _inputs(assets, backbone=None):
  """The input fingerprints of a run on ``assets`` (the tiny backbone is also the encoder)."""
  data, default = assets
  backbone = backbone or default
  return checkpointing.input_fingerprints(
    backbone=backbone, encoder=backbone, dataset=data.directory
  )


def _run(config, workdir, assets, stop_after=None, inputs=None, log=lambda *_: None):
  data, backbone = assets
  wrap = None if stop_after is None else (lambda dataset: _CrashAfter(dataset, stop_after))
  return train_on_survey(
    config, workdir, data, backbone, wrap=wrap, inputs=inputs or _inputs(assets), log=log
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


def _saved_states(directory):
  """{step: its saved state as numpy arrays}, read back by Orbax without our checks."""
  manager = checkpointing.TrainCheckpoints(str(directory), config_json={}, read_only=True).manager
  as_numpy = lambda metadata: jax.tree.map(  # noqa: E731
    lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata
  )
  states = {
    step: manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(restore_args=as_numpy(manager.item_metadata(step)["state"]))
      ),
    )["state"]
    for step in manager.all_steps()
  }
  manager.close()
  return states


def test_nonfinite_state_is_never_checkpointed_nor_resumed(assets, straight, tmp_path):
  # A finite but huge rate overflows the state at once; the loss of that step is still finite,
  # so a check of the loss alone saved parameters holding NaN as "the last good checkpoint".
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
  with pytest.raises(loop.NonFiniteLoss, match=r"state not finite at step \d+; stopping") as err:
    _run(config, str(tmp_path / "huge"), assets)
  named = int(re.search(r"last finite checkpoint \(step (\d+)\)", str(err.value)).group(1))
  saved = _saved_states(tmp_path / "huge" / "checkpoints")
  assert max(saved) == named
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved))

  # A non-finite step written before this check (planted: one NaN in step 6's state, saved as
  # step 7) is never resumed from or scored: it is named and set aside like an unreadable one.
  workdir = _copy_of(straight, tmp_path)
  state = _saved_states(workdir / "checkpoints")[6]
  leaf = jax.tree.leaves(state["trainable"])[0]
  leaf.reshape(-1)[0] = np.nan
  ckpt = checkpointing.TrainCheckpoints.of(
    _config(), str(workdir / "checkpoints"), inputs=_inputs(assets)
  )
  data_state = ckpt.manager.restore(6, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
  ckpt.save(7, {**state, "step": np.asarray(7, np.int64)}, data_state["data"], force=True)
  ckpt.wait()
  ckpt.close()
  stop = _config(**{"train.num_steps": 7, "train.on_corrupt_checkpoint": "stop"})
  with pytest.raises(
    checkpointing.UnreadableCheckpoint, match=r"step 7 .*NonFiniteCheckpoint: 1 of its \d+ float"
  ):
    _run(stop, str(workdir), assets)
  logs = []
  resumed = _run(_config(**{"train.num_steps": 7}), str(workdir), assets, log=logs.append)
  assert any(re.search(r"step 7 .*inf or NaN.* resuming from step 6", m) for m in logs)
  assert len(resumed.losses) == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(_saved_states(workdir / "checkpoints")))


def test_tiny_backbone_is_rebuilt_when_its_warmup_settings_change(assets, tmp_path):
  data, backbone = assets
  # A copy of the main job's cache, so that the rebuilt backbone lands beside the copy.
  cache = os.path.dirname(backbone)
  assets_dir = tmp_path / "assets"
  shutil.copytree(cache, assets_dir / os.path.basename(cache))
  copied = str(assets_dir / os.path.basename(cache) / "warmed_up")
  logs = []
  assert (
    runtime.build_tiny_backbone(_config(), str(assets_dir), data, survey.TASK, logs.append)
    == copied
  )
  assert logs == [
    f"reusing the warmed-up tiny backbone in {copied} (same data and warm-up settings)"
  ]
  other = runtime.build_tiny_backbone(
    _config(**{"tiny_backbone.warmup_steps": 1}), str(assets_dir), data, survey.TASK, logs.append
  )
  assert other != copied and "warm-up" in logs[-1]
  assert fingerprint.fingerprint(other) != fingerprint.fingerprint(backbone)


def test_progress_is_a_line_every_few_seconds_off_a_terminal():
  stream = io.StringIO()  # Not a terminal, like CI or a cluster log.
  bar = loop.progress_bar(60, 0, enabled=True, stream=stream)
  for _ in range(60):
    time.sleep(0.01)  # 0.6 s in all: a terminal bar would redraw several times.
    bar.update(1)
  bar.close()
  lines = stream.getvalue().split("\n")
  assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
  assert [line.split("|")[0] for line in lines] == ["train:   0%", "train: 100%", ""]
