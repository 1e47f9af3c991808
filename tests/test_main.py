"""The command line: `python -m cuma_jax.main` runs the `tiny` experiment end to end.

The run itself is the session fixture `main_job` (conftest.py), started when the session
starts; its workdir is reused by the training-loop tests.
"""

import json
import os
import pathlib
import re
import sys
from unittest import mock

import numpy as np
import pytest

from cuma_jax.training import checkpointing

pytestmark = pytest.mark.slow


def test_main_job_runs_end_to_end_on_tiny(main_job):
  proc, workdir = main_job
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "trained: accuracy" in proc.stdout
  # Its stderr is a file: no progress bar redrawn with carriage returns or escape sequences.
  assert "\r" not in proc.stderr and "\x1b" not in proc.stderr, proc.stderr[-3000:]
  assert os.listdir(workdir / "train" / "checkpoints")
  records = [
    json.loads(l)
    for l in pathlib.Path(workdir / "train" / "metrics.jsonl").read_text().splitlines()
  ]
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
  results = json.loads(pathlib.Path(workdir / "results.json").read_text())
  assert set(results["trained"]) == {"test", "zero_shot"}
  # The LoRA baseline (eval.baselines): trained beside the run, on its backbone, in its table.
  lora = workdir / "baselines" / "lora"
  assert re.search(r"\[test\] +lora: accuracy", proc.stdout)
  assert set(results["baselines"]["lora"]) == {"test", "zero_shot"}
  assert (
    results["baselines"]["lora"]["test"]["model"]
    == json.loads(pathlib.Path(lora / "results.json").read_text())["trained"]["test"]["model"]
  )
  saved = json.loads(pathlib.Path(lora / "results.json").read_text())["run"]["config"]
  assert saved["method"] == "lora" and saved["model"]["checkpoint"].startswith(str(workdir))
  assert [
    json.loads(l)["step"]
    for l in pathlib.Path(lora / "train" / "metrics.jsonl").read_text().splitlines()
  ] == [1, 2, 3]
  assert not (lora / "tfds").exists() and not (lora / "assets").exists()  # shared, not rebuilt
  assert (workdir / "LOCK").read_text() == ""  # Released.


def test_an_unknown_config_key_is_named_with_the_closest(capsys):
  from cuma_jax import main

  for arg, closest in (
    ("--config.nope=1", "['mode']"),
    ("--config.optim.learning_rat=1", "['optim.learning_rate'"),
  ):
    with pytest.raises(SystemExit, match="1"):
      main.parse_flags(["main", "--config=configs/cuma.py:tiny", arg])
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{arg}: config.{arg[9:].split('=')[0]} is not a" in error
    assert f"the closest are {closest}" in error


def _run_main(*args):
  """``python -m cuma_jax.main --config=configs/cuma.py:tiny ARGS`` in this process (absl's
  flags are global: parsed here, forgotten after; ml_collections reads its overrides'
  names from ``sys.argv``)."""
  from absl import flags

  from cuma_jax import main

  argv = ["main", "--config=configs/cuma.py:tiny", *args]
  with mock.patch.object(sys, "argv", argv):
    main.parse_flags(argv)
  try:
    main.main(["main"])
  finally:
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
      delattr(flags.FLAGS, name)  # Defined by this parse; the next defines its own.


def test_a_refusal_is_one_line_without_a_traceback(tmp_path, capsys, monkeypatch):
  monkeypatch.delenv("CUMA_TRACEBACK", raising=False)
  not_a_directory = tmp_path / "file"
  not_a_directory.write_text("")
  for args, says in (
    (["--config.optim.learning_rate=-1"], "ConfigError: config.optim.learning_rate=-1"),
    ([], f"WorkdirUnusable: --workdir {not_a_directory}: {not_a_directory} is a file"),
  ):
    with pytest.raises(SystemExit) as exit_:
      _run_main(f"--workdir={not_a_directory}", *args)
    assert exit_.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith(says) and error.count("\n") == 1, error
  assert not_a_directory.read_text() == ""  # Nothing written.


def test_verbose_or_the_environment_brings_a_refusals_traceback_back(tmp_path, monkeypatch):
  from cuma_jax import errors

  monkeypatch.delenv("CUMA_TRACEBACK", raising=False)
  with pytest.raises(errors.ConfigError, match="learning_rate"):
    _run_main(f"--workdir={tmp_path}", "--config.optim.learning_rate=-1", "--verbose")
  monkeypatch.setenv("CUMA_TRACEBACK", "1")
  with pytest.raises(errors.ConfigError, match="learning_rate"):
    _run_main(f"--workdir={tmp_path}", "--config.optim.learning_rate=-1")
