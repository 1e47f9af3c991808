"""Two processes on one machine (4 CPU devices each) run the job as a multi-host slice would:
the tensor-parallel axis spans both processes; they train, checkpoint, evaluate, export the
adapters, and a second two-process run restores the checkpoint and evaluates it again."""

import json
import os
import socket
import subprocess
import sys

from conftest import ROOT
from helpers import divisible_qwen3, main_job_inputs, tiny_config
import pytest
from safetensors.numpy import load_file

from cuma_jax.platforms import FAST_CPU_COMPILE_FLAGS

pytestmark = pytest.mark.slow

PROCESSES, DEVICES_EACH = 2, 4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_two_processes(workdir, *overrides):
  port = _free_port()
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_EACH} {FAST_CPU_COMPILE_FLAGS}",
    JAX_PLATFORMS="cpu",
  )
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "cuma_jax.main",
        f"--config={ROOT}/configs/cuma.py:tiny",
        f"--workdir={workdir}",
        f"--config.distributed.coordinator_address=localhost:{port}",
        f"--config.distributed.num_processes={PROCESSES}",
        f"--config.distributed.process_id={i}",
        *overrides,
      ],
      env=env,
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(PROCESSES)
  ]
  outputs = [p.communicate(timeout=600) for p in procs]
  for i, (p, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}\n{err[-6000:]}"
  return [out for out, _ in outputs]


def test_two_processes_train_checkpoint_evaluate_and_export(main_job, tmp_path):
  _, main_workdir = main_job
  config = tiny_config()
  _, warmed = main_job_inputs(main_workdir)
  # Eight heads and kv heads: the model axis of 8 devices splits them across the processes.
  backbone = divisible_qwen3(tmp_path / "backbone", warmed, heads=8, kv_heads=8)
  common = (
    f"--config.model.checkpoint={backbone}",
    f"--config.data.data_dir={main_workdir / 'tfds'}",
    "--config.mesh.rules_preset=tp",
    "--config.mesh.shape=(('model', 8),)",
    "--config.adapter.targets=('q_proj', 'v_proj', 'o_proj')",
    "--config.eval.baselines=()",
    "--config.eval.splits=('test',)",
  )
  workdir = tmp_path / "run"
  outputs = _run_two_processes(
    workdir, *common, "--config.train.num_steps=2", "--config.train.checkpoint_every=1"
  )
  # Process 0 reports; process 1 is silent.
  assert "[test]          trained: accuracy" in outputs[0]
  assert "accuracy" not in outputs[1]
  trained = json.loads((workdir / "results.json").read_text())
  assert sorted(os.listdir(workdir / "train" / "checkpoints")) == ["1", "2"]
  exported = load_file(str(workdir / "adapters" / "adapters.safetensors"))
  # The whole of every adapter, gathered from both processes: q's B over 8 heads x 8.
  (q_b,) = [v for k, v in exported.items() if k.endswith("q_proj_lora/b")][:1]
  assert q_b.shape == (config.adapter.num_experts, config.adapter.rank, 64)
  assert any(abs(v).max() > 0 for k, v in exported.items() if k.endswith("lora/b"))

  _run_two_processes(workdir, *common, "--config.train.num_steps=2", "--config.mode=eval")
  evaluated = json.loads((workdir / "results.json").read_text())
  assert evaluated["trained"]["test"]["model"] == trained["trained"]["test"]["model"]
