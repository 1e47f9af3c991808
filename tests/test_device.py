"""Checks of the accelerator's own numerics, on whatever backend JAX runs (``-m device``).

In CI they run on the CPU beside the rest of the suite; on a lent GPU,
``experiments/device/run.py`` runs them with every other ``device`` test, Hugging Face's
PyTorch model then on the same card (the oracle computes there too).
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cuma_jax import presets, schema, sharding
from cuma_jax.models.pretrained import load_pretrained
from cuma_jax.params import partition
from cuma_jax.training import optim
from cuma_jax.training.loop import ShardedStep

pytestmark = pytest.mark.device

ROWS, LENGTH = 3, 12


def _torch_device() -> str:
  """Where the oracle runs: the GPU JAX uses, when torch sees one too."""
  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def _ids(vocab, seed=0):
  return np.random.default_rng(seed).integers(1, vocab, (ROWS, LENGTH))


def _torch_logits(model, ids, dtype):
  model = copy.deepcopy(model).to(device=_torch_device(), dtype=dtype)
  with torch.no_grad():
    logits = model(input_ids=torch.as_tensor(ids, device=_torch_device())).logits
  return logits.float().cpu().numpy()


def test_float32_logits_match_hugging_face(tiny_checkpoint, pretrained):
  """float32 at full matmul precision: the same tolerance as on the CPU."""
  _, torch_model = tiny_checkpoint("qwen3")
  ids = _ids(torch_model.config.vocab_size)
  module, params = pretrained("qwen3")
  with jax.default_matmul_precision("highest"):
    logits = jax.jit(module.apply)({"params": params}, jnp.asarray(ids))
  expected = _torch_logits(torch_model, ids, torch.float32)
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


def test_bfloat16_logits_as_close_to_float32_as_hugging_faces(tiny_checkpoint, pretrained):
  """bf16 weights and activations: our error against the float32 logits stays within
  twice Hugging Face's own bf16 error (its bf16 model on the same device)."""
  _, torch_model = tiny_checkpoint("qwen3")
  ids = _ids(torch_model.config.vocab_size, seed=1)
  module, params = pretrained("qwen3", dtype=jnp.bfloat16)
  ours = np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(ids)))
  exact = _torch_logits(torch_model, ids, torch.float32)
  theirs = _torch_logits(torch_model, ids, torch.bfloat16)
  their_error = np.abs(theirs - exact).max()
  assert np.abs(ours - exact).max() <= 2 * their_error


def _step_config():
  config = presets.experiment_config("cuma", "tiny")
  with config.unlocked():
    presets.apply_overrides(
      config,
      {
        "adapter.targets": ("q_proj", "v_proj"),
        "adapter.num_experts": 4,
        "adapter.top_k": 2,
        "adapter.rank": 4,
        "adapter.router_hidden": (16,),
        "adapter.demographic_dim": 8,
        "data.batch_size": ROWS,
        "data.max_length": LENGTH,
        "mesh.shape": (("data", 1),),
        "optim.schedule": "constant",  # the first step moves the weights
        "optim.warmup_steps": 0,
      },
    )
  return schema.validate(config)


@pytest.mark.slow  # on the CPU; a lent accelerator runs it (-m device)
def test_sharded_step_on_the_devices_mesh_trains_from_hugging_faces_loss(tiny_checkpoint):
  """One jitted, sharded training step on a mesh of the first device. At initialisation
  (B = 0) the adapted model is the frozen one, so the step's loss is Hugging Face's
  cross-entropy at the supervised positions; the step then moves every trainable array."""
  directory, torch_model = tiny_checkpoint("qwen3")
  config = _step_config()
  layout = sharding.Layout.of(config.mesh, jax.devices()[:1])
  module, params = load_pretrained(
    directory, adapter=schema.adapter_config(config), rng=jax.random.key(0)
  )
  trainable, frozen = partition(params, config.trainable)
  tx = optim.make_optimizer(config.optim, 10)
  sharded = ShardedStep.of(config, module, layout, tx, trainable)
  ids = _ids(torch_model.config.vocab_size, seed=2)
  loss_mask = np.zeros_like(ids)
  loss_mask[:, -4:-1] = 1
  batch = {
    "input_ids": ids,
    "attention_mask": np.ones_like(ids),
    "targets": np.roll(ids, -1, axis=1),
    "loss_mask": loss_mask,
    "profile_index": np.arange(ROWS),
  }
  batch = {k: jax.device_put(v.astype(np.int32), layout.batch) for k, v in batch.items()}
  table = np.random.default_rng(3).normal(size=(ROWS, 8)).astype(np.float32)
  before = jax.tree.map(np.asarray, trainable)
  with layout.active(), jax.default_matmul_precision("highest"):
    trainable = jax.device_put(trainable, sharded.trainable)
    opt_state = jax.jit(tx.init, out_shardings=sharded.opt_state)(trainable)
    after, _, metrics = sharded.step(
      trainable,
      jax.device_put(frozen, sharded.frozen),
      opt_state,
      jax.device_put(table, layout.replicated),
      batch,
      jax.random.key(0),
    )
  logits = torch.as_tensor(_torch_logits(torch_model, ids, torch.float32))
  nll = torch.nn.functional.cross_entropy(
    logits.reshape(-1, logits.shape[-1]),
    torch.as_tensor(np.roll(ids, -1, axis=1)).reshape(-1),
    reduction="none",
  ).reshape(ids.shape)
  expected = float((nll * torch.as_tensor(loss_mask)).sum() / loss_mask.sum())
  np.testing.assert_allclose(float(metrics["task_loss"]), expected, rtol=1e-5)
  assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), after, before)
  assert all(jax.tree.leaves(moved)), moved
