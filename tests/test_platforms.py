"""No TPU backend is started on a machine without a TPU (libtpu stays quiet)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from cuma_jax import platforms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # a fresh JAX process


@pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None
  or platforms.tpu_attached()
  or platforms.gpu_attached(),
  reason="needs libtpu installed on a machine with neither a TPU nor a GPU",
)
def test_a_cpu_machine_starts_no_tpu_backend():
  script = (
    "from cuma_jax import platforms; chose = platforms.skip_absent_tpu(); import jax; "
    "print(chose, jax.default_backend(), len(jax.devices()))"
  )
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  proc = subprocess.run(
    [sys.executable, "-c", script],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=dict(env, PYTHONPATH=ROOT),
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["True", "cpu", "1"]
  assert "TPU" not in proc.stderr, proc.stderr
  # A platform set by hand is left alone.
  proc = subprocess.run(
    [sys.executable, "-c", script],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=dict(env, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
    timeout=120,
  )
  assert proc.stdout.split() == ["False", "cpu", "1"], proc.stderr[-2000:]
