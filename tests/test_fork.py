"""The fork trial: a sharpened gate and a z-only router with parameters of their own, in one
file outside the package (experiments/fork/zonly_router.py), train, evaluate from the
workdir's recorded config alone, and restore in a fresh process that never imports them by
hand.  The shared inputs (prepared survey, warmed-up backbone) are the main job's."""

import glob
import json
import os
import subprocess
import sys

import pytest

from cuma_jax import api, overrides, presets, tasks

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORK = "experiments.fork.zonly_router"

RESTORE = f"""
import json, sys
import jax
import cuma_jax
assert {FORK!r} not in sys.modules
experiment = cuma_jax.restore(sys.argv[1], log=lambda *_: None)
widths = sorted({{
  leaf.shape[-1]
  for path, leaf in jax.tree_util.tree_leaves_with_path(experiment.params)
  if "_router" in jax.tree_util.keystr(path) and "hidden" in jax.tree_util.keystr(path)
}})
print(json.dumps({{
  "imported": {FORK!r} in sys.modules,
  "router_kwargs": cuma_jax.schema.as_dict(experiment.config.adapter.router_kwargs),
  "gate_kwargs": cuma_jax.schema.as_dict(experiment.config.adapter.gate_kwargs),
  "hidden_widths": widths,
  "test": experiment.evaluate("test")["model"],
}}))
"""


def test_the_fork_trains_evaluates_and_restores_from_its_workdir(main_job, tmp_path, monkeypatch):
  _, main = main_job
  (backbone,) = glob.glob(str(main / "assets" / "tiny_backbone_*" / "warmed_up"))
  monkeypatch.syspath_prepend(ROOT)  # as `python -m cuma_jax.main` run from the repository
  workdir = str(tmp_path / "zonly")
  fork = {
    "adapter.plugins": (FORK,),
    "adapter.router": "zonly",
    "adapter.router_kwargs.hidden": 16,
    "adapter.gate": "sharpened",
    "adapter.gate_kwargs.sharpness": 3,
  }
  shared = {"model.checkpoint": backbone, "data.data_dir": str(main / "tfds")}
  config = presets.experiment_config(
    "cuma", "tiny", overrides={**fork, **shared, "train.num_steps": 3, "eval.untrained": False}
  )
  trained = api.run(config, workdir, log=lambda *_: None)["trained"]

  # mode=eval from the recorded config alone: no fork flag repeated, nothing refused.
  config = overrides.resolve(
    tasks.recorded_config(workdir),
    {"mode": "eval"},
    workdir,
    from_workdir=True,
    log=lambda *_: None,
  )
  assert config.adapter.router_kwargs.to_dict() == {"hidden": 16, "temperature": 1.0}
  assert config.adapter.gate_kwargs.to_dict() == {"sharpness": 3.0}
  assert api.run(config, workdir, log=lambda *_: None)["trained"] == trained

  proc = subprocess.run(
    [sys.executable, "-c", RESTORE, workdir], cwd=ROOT, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  restored = json.loads(proc.stdout.strip().splitlines()[-1])
  assert restored["imported"] and restored["hidden_widths"] == [16]
  assert restored["router_kwargs"] == {"hidden": 16, "temperature": 1.0}
  assert restored["gate_kwargs"] == {"sharpness": 3.0}
  for metric in ("accuracy", "macro_f1", "emd_mean"):
    assert restored["test"][metric] == pytest.approx(trained["test"]["model"][metric], abs=1e-6)
