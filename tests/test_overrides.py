"""The command line's overrides: without --config a run starts from the workdir's recorded
config and the overrides are only what changes, classed for resume as ever; a variant's
parameters are taken out of absl's arguments."""

import dataclasses
import os

import numpy as np
import pytest

from cuma_jax import fields, overrides, presets, schema, tasks
from cuma_jax.layers import routing
from cuma_jax.training import checkpointing


def test_split_argv_takes_out_the_variant_parameters_and_names_the_default_config():
  argv = [
    "main",
    "--workdir=w",
    "--config.mode=eval",
    "--config.adapter.router_kwargs.hidden=16",
    "--config.adapter.gate_kwargs.sharpness",
    "2.5",
    "--config.adapter.router_kwargs.name=abc",
    "--config.adapter.router_kwargs.on=true",
  ]
  rest, params, given = overrides.split_argv(argv)
  assert rest == [
    "main",
    f"--config={overrides.DEFAULT_CONFIG}",
    "--workdir=w",
    "--config.mode=eval",
  ]
  assert params == {
    "adapter.router_kwargs.hidden": 16,
    "adapter.gate_kwargs.sharpness": 2.5,
    "adapter.router_kwargs.name": "abc",
    "adapter.router_kwargs.on": True,
  }
  assert not given
  rest, params, given = overrides.split_argv(["main", "--config=configs/cuma.py:tiny", "--x=1"])
  assert rest == ["main", "--config=configs/cuma.py:tiny", "--x=1"] and params == {} and given
  assert overrides.get_config() == schema.defaults()


def _trained(directory, **changes):
  """A checkpoint (a stand-in state) written by the tiny preset with ``changes``."""
  config = schema.validate(presets.experiment_config("cuma", "tiny", overrides=changes))
  ckpt = checkpointing.TrainCheckpoints.of(config, str(directory))
  ckpt.save(1, {"w": np.zeros(2, np.float32)}, {}, force=True)
  ckpt.wait()
  ckpt.close()
  return config


RECORDED = {"adapter.rank": 4, "adapter.router": "demographics", "train.num_steps": 3}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  config = _trained(workdir / "train" / "checkpoints", **RECORDED)
  return str(workdir), config


def _resolve(workdir, changes, config=None):
  """The config a command line runs, as ``cuma_jax.main`` resolves it, typed."""
  from_workdir = config is None
  base = tasks.recorded_config(workdir) if from_workdir else config
  return schema.validate(
    overrides.resolve(base, changes, workdir, from_workdir=from_workdir, log=lambda *_: None)
  )


def test_without_config_a_run_starts_from_the_recorded_config(workdir):
  workdir, trained = workdir
  assert tasks.recorded_config(workdir).to_dict() == schema.as_dict(trained)
  config = _resolve(workdir, {"mode": "eval"})
  assert config.mode == "eval"
  assert dataclasses.replace(config, mode="train") == trained
  check = dict(config_conflicts=schema.resume_conflicts)
  assert checkpointing.check_workdir(config, os.path.join(workdir, "train", "checkpoints"), **check)
  # A free change is taken; a change of what defines the experiment is refused, as ever.
  config = _resolve(workdir, {"mode": "eval", "eval.batch_size": 8, "train.num_steps": 6})
  assert config.eval.batch_size == 8 and config.adapter.rank == 4
  checkpointing.check_workdir(config, os.path.join(workdir, "train", "checkpoints"), **check)
  config = _resolve(workdir, {"adapter.rank": 8})
  with pytest.raises(checkpointing.CheckpointConfigMismatch, match=r"adapter\.rank: 4 -> 8"):
    checkpointing.check_workdir(config, os.path.join(workdir, "train", "checkpoints"), **check)


def test_a_given_config_is_the_base_as_before(workdir):
  workdir, _ = workdir
  config = _resolve(workdir, {"mode": "eval"}, presets.experiment_config("cuma", "tiny"))
  assert config.adapter.rank == 8  # the file's, not the workdir's: refused as a mismatch
  with pytest.raises(checkpointing.CheckpointConfigMismatch, match=r"adapter\.rank: 4 -> 8"):
    checkpointing.check_workdir(
      config,
      os.path.join(workdir, "train", "checkpoints"),
      config_conflicts=schema.resume_conflicts,
    )


def test_without_config_or_checkpoint_the_run_is_refused_in_one_line(tmp_path):
  with pytest.raises(ValueError, match=r"^--config is not given and .* holds no checkpoint .*"):
    _resolve(str(tmp_path), {"mode": "eval"})
  assert os.listdir(tmp_path) == []


def test_the_furthest_stage_s_config_is_the_recorded_one(tmp_path):
  """One rule for the command line and for restore: the furthest-trained stage's config,
  whatever the files' times (a copied workdir does not keep them)."""
  _trained(tmp_path / "sft" / "checkpoints", **{"adapter.rank": 2})
  _trained(tmp_path / "dpo" / "checkpoints", **{"adapter.rank": 3})
  old = os.path.getmtime(tmp_path / "dpo" / "checkpoints" / "1") - 60
  os.utime(tmp_path / "dpo" / "checkpoints" / "1", (old, old))
  assert tasks.recorded_config(str(tmp_path)).adapter.rank == 3
  saved = tasks.saved_config(str(tmp_path))
  assert (saved.adapter.rank, saved.mode) == (3, "eval")
  assert tasks.recorded_config(str(tmp_path / "none")) is None


def test_overrides_of_a_variant_s_parameters_apply_over_the_recorded_ones(workdir):
  workdir, _ = workdir
  config = _resolve(workdir, {"adapter.router": "token_and_demographics"})
  assert config.adapter.router_kwargs == fields.NoParams()
  with pytest.raises(ValueError, match=r"router_kwargs\.hidden is not a parameter of router kind"):
    _resolve(workdir, {"adapter.router_kwargs.hidden": 3})


def test_help_flags_import_the_plugins_the_command_line_lists(tmp_path, monkeypatch):
  (tmp_path / "my_help_plugin.py").write_text(
    "import dataclasses\n"
    "from cuma_jax.fields import field\n"
    "from cuma_jax.layers import routing\n"
    "@dataclasses.dataclass(frozen=True)\n"
    "class Params:\n"
    "  sharpness: float = field(2.0, low=1)  # the exponent\n"
    "routing.register_gate('test_help_gate', params=Params)(lambda l, p, t, params: p)\n"
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  try:
    texts = overrides.help_flags(["main", "--config.adapter.plugins=my_help_plugin", "--helpfull"])
    # Another gate registered in this process (a fork's) may declare the same name.
    assert "gate 'test_help_gate': the exponent (>= 1; default 2.0)" in texts[
      "config.adapter.gate_kwargs.sharpness"
    ].split(" | ")
    assert texts["config.adapter.rank"].endswith("(>= 1; default 8)")
  finally:
    routing.GATES.unregister("test_help_gate")
