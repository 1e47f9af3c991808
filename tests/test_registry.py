"""Extension points: a fork registers a gate and a router kind from its own file (here, this
test file), selects them by config value, and trains the tiny model with them; the shipped
variants are selectable from the command line."""

import os
import re
import subprocess
import sys

import flax.linen as nn
from helpers import main_job_inputs
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cuma_jax import presets, runtime, schema
from cuma_jax.data.pipeline import SurveyTables, make_dataset
from cuma_jax.layers import adapter, routing
from cuma_jax.models import pretrained
from cuma_jax.params import merge_params
from cuma_jax.registry import Registry
from cuma_jax.tasks import survey
from cuma_jax.training import loop

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_registry_names_the_config_key_and_what_is_registered():
  reg = Registry("widget", "adapter.widget")
  reg.register("a", 1)

  @reg.register("b")
  def b():
    return 2

  assert reg.names() == ("a", "b") and reg.get("b") is b and "a" in reg
  with pytest.raises(ValueError, match=r"adapter\.widget='c' is not a registered widget.*'a', 'b'"):
    reg.get("c")
  with pytest.raises(ValueError, match="already registered"):
    reg.register("a", 3)


# --- What a fork writes, in its own file: a gate and a router kind. -------------------------


def winner_takes_all(top_logits, top_probs, temperature):
  """All weight on the most probable of the k selected experts."""
  del top_logits, temperature
  return jax.nn.one_hot(jnp.zeros(top_probs.shape[:-1], jnp.int32), top_probs.shape[-1])


class ConstantRouter(nn.Module):
  """One learned logit vector for every token of every profile: [1, 1, N]."""

  num_experts: int
  hidden_dims: tuple = ()
  dropout: float = 0.0
  in_axis: str = ""
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, z, deterministic=True):
    logits = self.param("logits", nn.initializers.normal(1.0), (self.num_experts,))
    return logits[None, None, :]


@pytest.fixture(scope="module")
def registered():
  routing.GATES.register("test_winner_takes_all", routing.Gate(winner_takes_all))
  adapter.ROUTERS.register("test_constant", adapter.RouterKind(ConstantRouter, False))
  yield
  routing.GATES.unregister("test_winner_takes_all")
  adapter.ROUTERS.unregister("test_constant")


@pytest.fixture(scope="module")
def assets(main_job):
  """The tiny survey and warmed-up tiny backbone of the session's main-job run."""
  _, workdir = main_job
  return main_job_inputs(workdir)


def _config(**overrides):
  c = presets.experiment_config("cuma", "tiny")
  c.unlock()
  presets.apply_overrides(c, overrides)
  c.train.update(num_steps=3, checkpoint_every=3)
  return schema.validate(c)


def _train_and_capture(config, assets, workdir):
  """Trains 3 steps; returns (losses, params before, params after, captured routing)."""
  data, backbone = assets
  module, params = pretrained.load_pretrained(
    backbone, adapter=schema.adapter_config(config), rng=jax.random.PRNGKey(0)
  )
  tokenizer = pretrained.load_tokenizer(backbone)
  tables = SurveyTables.of(data.sources["train"])
  demographics = runtime.make_demographics(config, backbone, survey.TASK, data.sources["train"])
  dataset, _ = make_dataset(
    data.sources["train"],
    tokenizer,
    max_length=config.data.max_length,
    batch_size=config.data.batch_size,
    seed=0,
    num_epochs=None,
    demographic_system_prompt=False,
    tables=tables,
  )
  table = survey.demographic_table(demographics, tables)
  before = jax.tree.map(np.array, params)  # training donates its buffers
  result = loop.train(
    config,
    str(workdir),
    module,
    params,
    dataset,
    num_steps=3,
    demographic_table=table,
    log=lambda *_: None,
  )
  trained = merge_params(result.trainable, result.frozen)
  batch = next(iter(dataset))
  z = None if table is None else jnp.asarray(table)[batch["profile_index"]]
  capture = jax.jit(module.clone(capture_routing=True).apply)
  _, aux = capture(
    {"params": trained},
    batch["input_ids"],
    attention_mask=batch["attention_mask"],
    demographics=z,
  )
  return result.losses, before, trained, aux["routing"], batch


def _changed(before, after, part):
  """Whether any parameter whose path names ``part`` moved in training."""
  a = jax.tree_util.tree_leaves_with_path(before)
  b = dict(jax.tree_util.tree_leaves_with_path(after))
  return any(not np.allclose(v, b[k]) for k, v in a if part in jax.tree_util.keystr(k))


def test_fork_gate_with_shipped_demographic_router(registered, assets, tmp_path):
  config = _config(**{"adapter.gate": "test_winner_takes_all", "adapter.router": "demographics"})
  losses, before, after, decisions, batch = _train_and_capture(config, assets, tmp_path)
  assert len(losses) == 3 and all(np.isfinite(losses))
  # The experts trained; the routers did not: the fork's gate is constant in the logits
  # (winner takes all), so neither the task loss nor the balance loss reaches them.
  assert _changed(before, after, "_lora")
  assert not _changed(before, after, "_router")
  mask = np.asarray(batch["attention_mask"], bool)
  for router, d in decisions.items():
    gates, experts = np.asarray(d["gates"]), np.asarray(d["experts"])
    # The fork's gate: all weight on the first selected expert.
    np.testing.assert_array_equal(gates[..., 0], 1.0)
    np.testing.assert_array_equal(gates[..., 1:], 0.0)
    # The demographic router: every token of a sequence takes the same experts.
    first = experts[:, :, :1]
    assert np.all((experts == first)[:, mask]), router


def test_fork_router_with_shipped_tempered_gate(registered, assets, tmp_path):
  config = _config(
    **{
      "adapter.router": "test_constant",
      "adapter.gate": "tempered_softmax_top_logits",
      "adapter.gate_temperature": 0.5,
    }
  )
  losses, _, after, decisions, _ = _train_and_capture(config, assets, tmp_path)
  assert len(losses) == 3 and all(np.isfinite(losses))
  layer = after["layers_0"]["self_attn"]["adapters_in"]
  logits = np.asarray(layer["q_proj_router"]["logits"])
  order = np.argsort(-logits, kind="stable")[:2]
  top = logits[order] / 0.5
  expected = np.exp(top - top.max()) / np.exp(top - top.max()).sum()
  d = decisions["q_proj"]
  # Layer 0, every token: the router's own two best experts, tempered-softmax gates.
  np.testing.assert_array_equal(
    np.asarray(d["experts"])[0], np.broadcast_to(order, d["experts"].shape[1:])
  )
  np.testing.assert_allclose(
    np.asarray(d["gates"])[0], np.broadcast_to(expected, d["gates"].shape[1:]), rtol=1e-5
  )


def _count_cli(*overrides):
  """Runs ``python -m cuma_jax.param_count`` on the tiny preset; returns its output."""
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "cuma_jax.param_count",
      f"--config={ROOT}/configs/cuma.py:tiny",
      *overrides,
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=300,
    env=dict(os.environ, XLA_FLAGS=""),
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout


def _trainable(output):
  return int(re.search(r"trainable parameters: ([\d,]+)", output).group(1).replace(",", ""))


def test_shipped_variants_are_selectable_from_the_command_line():
  default = _count_cli()
  variant = _count_cli(
    "--config.adapter.router=demographics",
    "--config.adapter.gate=tempered_softmax_top_logits",
    "--config.adapter.gate_temperature=0.5",
  )
  assert "router=demographics gate=tempered_softmax_top_logits" in variant
  # The demographic router lacks the token router's x block [d_in, hidden] and nothing
  # else: per layer, q/k/v and gate/up read the hidden size (32), o and down read 64
  # (4 heads x 16 and the 2 x 32 MLP), each router's hidden width is 32, 2 layers.
  d_in = 3 * 32 + 64 + 2 * 32 + 64
  assert _trainable(default) - _trainable(variant) == 2 * d_in * 32
