"""A trained workdir back as objects (``cuma_jax.restore``) and its routing per profile and
per latent culture, on the session's run of the main job (`tiny` preset)."""

import json
import os

import numpy as np
import pytest

import cuma_jax
from cuma_jax import job, presets, schema


@pytest.fixture(scope="module")
def trained(main_job):
  _, workdir = main_job
  return str(workdir), cuma_jax.restore(str(workdir), log=lambda *_: None)


def test_restore_reproduces_the_jobs_printed_metrics(trained):
  workdir, experiment = trained
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert experiment.config.mode == "eval" and experiment.config.method == "cuma"
  for split in ("test", "zero_shot"):
    assert experiment.evaluate(split) == results["trained"][split]
  assert sorted(os.listdir(workdir)) == [
    "LOCK",
    "adapters",
    "assets",
    "baselines",
    "results.json",
    "tfds",
    "train",
  ]


def test_results_record_what_reproduces_the_run(trained):
  import flax
  import jax
  import jaxlib
  import numpy
  import optax
  import orbax.checkpoint
  import transformers

  workdir, _ = trained
  with open(os.path.join(workdir, "results.json")) as f:
    run = json.load(f)["run"]
  # The recorded config rebuilds exactly the config that ran (the main job's 3 steps).
  config = presets.experiment_config("cuma", "tiny")
  config.unlock()
  config.train.num_steps = 3
  assert schema.from_dict(run["config"]) == schema.validate(config)
  assert run["seed"] == config.seed
  modules = (jax, jaxlib, flax, optax, orbax.checkpoint, transformers, numpy)
  assert [run["versions"][n] for n in job.RECORDED_PACKAGES] == [m.__version__ for m in modules]
  # The main job runs in its own process on one host device.
  assert run["devices"] == {"kind": jax.devices()[0].device_kind, "count": 1}


def test_restore_of_an_empty_workdir_says_so(tmp_path):
  with pytest.raises(FileNotFoundError, match="has no training checkpoint"):
    cuma_jax.restore(str(tmp_path))
  assert os.listdir(tmp_path) == []  # nothing written


def test_routing_usage_per_profile(trained):
  _, experiment = trained
  usage = cuma_jax.routing_usage(experiment, "test")
  dataset, tables = experiment.dataset("test")
  # Tokens per profile, counted independently from the batches' attention masks.
  tokens = {}
  for batch in dataset:
    for index, mask in zip(batch["profile_index"], batch["attention_mask"]):
      profile = tables.profiles[index]
      tokens[profile] = tokens.get(profile, 0) + int(mask.sum())
  assert usage.profiles == tuple(sorted(tokens))
  np.testing.assert_array_equal(usage.tokens, [tokens[p] for p in usage.profiles])
  num_layers, num_experts = 2, experiment.config.adapter.num_experts
  assert set(usage.usage) == {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
  }
  for router, u in usage.usage.items():
    assert u.shape == (len(usage.profiles), num_layers, num_experts)
    # The released code's gates are a softmax over the top-k: each token's gates sum to 1.
    np.testing.assert_allclose(u.sum(-1), 1.0, rtol=1e-5)
    assert np.all(u >= 0)


def test_usage_by_latent_culture(trained):
  _, experiment = trained
  usage = cuma_jax.routing_usage(experiment, "test")
  label = cuma_jax.latent_culture(experiment.data.oracle)
  groups = cuma_jax.usage_by_group(usage, label)
  labels = np.array([label(p) for p in usage.profiles])
  assert set(groups) == set(labels)
  for group, by_router in groups.items():
    rows = labels == group
    for router, u in by_router.items():
      # Token-weighted mean, written out.
      expected = (usage.usage[router][rows] * usage.tokens[rows, None, None]).sum(0)
      np.testing.assert_allclose(u, expected / usage.tokens[rows].sum(), rtol=1e-6)
  with pytest.raises(ValueError, match="labels for"):
    cuma_jax.usage_by_group(usage, ["one"])
