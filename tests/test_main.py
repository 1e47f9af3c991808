"""The command line: `python -m cuma_jax.main` runs the `tiny` experiment end to end.

The run itself is the session fixture `main_job` (conftest.py), started when the session
starts; its workdir is reused by the training-loop tests.
"""

import json
import os

import numpy as np

from cuma_jax.training import checkpointing


def test_main_job_runs_end_to_end_on_tiny(main_job):
  proc, workdir = main_job
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
  assert (workdir / "LOCK").read_text() == ""  # Released.
