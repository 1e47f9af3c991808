"""Which JAX backends a command starts: no TPU backend on a machine without a TPU.

libtpu is installed beside JAX to compile for TPU topologies ahead of time (``cuma_jax.plan``)
on any machine. JAX then tries to start a TPU backend in every process, and on a machine with
no TPU libtpu logs "TPU initialization failed" and a ``TPU_WORKER_HOSTNAMES`` error that a
person cannot act on. Ahead-of-time compilation does not use that backend, so skipping it
changes nothing else.
"""

from __future__ import annotations

import glob
import os
import pathlib

# XLA:CPU settings for tiny programs, whose compiling takes longer than their running: the
# costly LLVM passes and the fusion emitters off, one code-generation thread. Set in
# XLA_FLAGS before JAX starts, by the tests, the quick study and the device run's CPU smoke.
FAST_CPU_COMPILE_FLAGS = (
  "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
  "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
)
# PCI vendor of Google's TPU chips; TPU VMs of v4 and earlier also expose /dev/accel*.
_GOOGLE_PCI_VENDOR = "0x1ae0"
# Devices through which JAX finds a GPU (NVIDIA, or AMD through ROCm).
_GPU_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def tpu_attached() -> bool:
  """Whether this machine may have a TPU: a Google PCI device, or an /dev/accel* device."""
  vendors = (
    pathlib.Path(p).read_text().strip() for p in glob.glob("/sys/bus/pci/devices/*/vendor")
  )
  return any(v == _GOOGLE_PCI_VENDOR for v in vendors) or bool(glob.glob("/dev/accel*"))


def gpu_attached() -> bool:
  """Whether JAX may find a GPU here (the devices its CUDA and ROCm backends open)."""
  return any(os.path.exists(d) for d in _GPU_DEVICES)


def skip_absent_tpu() -> bool:
  """Runs on the CPU alone when the machine has neither a TPU nor a GPU; returns whether it
  chose that. Call before JAX starts its backends (its first device use).

  A platform the user chose (``JAX_PLATFORMS``, ``JAX_FORCE_TPU_INIT``) is left alone, and so
  is a machine with a GPU (JAX picks among its backends as usual there).
  """
  import jax  # here: the module's constants are read before JAX starts

  if (
    "JAX_PLATFORMS" in os.environ
    or "JAX_FORCE_TPU_INIT" in os.environ
    # Read through `values`: jax.config's typed interface does not declare its flags as attributes.
    or jax.config.values["jax_platforms"]
    or tpu_attached()
    or gpu_attached()
  ):
    return False
  jax.config.update("jax_platforms", "cpu")
  return True
