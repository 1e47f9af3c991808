"""A trained workdir back as objects (``cuma_jax.restore``) and its routing per profile and
per latent culture, on the session's run of the main job (`tiny` preset)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cuma_jax
from cuma_jax import presets, runtime, schema
from cuma_jax.evaluation.predict import NonFiniteLogits

pytestmark = pytest.mark.slow


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


def test_evaluation_refuses_non_finite_logits_naming_the_split(trained):
  # Before, mode=eval on a workdir whose parameters held NaN scored an argmax over NaN.
  _, experiment = trained
  params = experiment.params
  try:
    experiment.params = jax.tree.map(lambda x: x * jnp.nan, params)
    rows = len(experiment.data.sources["test"])
    with pytest.raises(NonFiniteLogits, match=rf"{rows} of {rows} examples of split 'test'"):
      experiment.evaluate("test")
  finally:
    experiment.params = params


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
  # The recorded config rebuilds exactly the config that ran (the main job's 3 steps, with
  # the LoRA baseline).
  config = presets.experiment_config("cuma", "tiny")
  config.unlock()
  config.train.num_steps = 3
  config.eval.baselines = ("lora",)
  assert schema.from_dict(run["config"]) == schema.validate(config)
  assert run["seed"] == config.seed
  modules = (jax, jaxlib, flax, optax, orbax.checkpoint, transformers, numpy)
  assert [run["versions"][n] for n in runtime.RECORDED_PACKAGES] == [m.__version__ for m in modules]
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
    for index, mask in zip(batch["profile_index"], batch["attention_mask"], strict=True):
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
  for _router, u in usage.usage.items():
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


def test_profile_field_reads_each_profiles_demographics(wvb_root, tmp_path):
  # The WorldValuesBench fixture through TFDS: the country each profile sentence names.
  import re

  import tensorflow_datasets as tfds

  source = tfds.data_source(
    "cuma_world_values_bench/sampled_50k",
    data_dir=str(tmp_path),
    download_and_prepare_kwargs={
      "download_config": tfds.download.DownloadConfig(manual_dir=str(wvb_root))
    },
  )["test"]
  country = cuma_jax.profile_field(source, "country")
  profiles = {
    r["profile"].decode() if isinstance(r["profile"], bytes) else r["profile"]
    for r in (source[i] for i in range(len(source)))
  }
  assert len(profiles) > 1
  for profile in profiles:
    assert country(profile) == re.match(r"You are a person from (.+?), age group", profile)[1]
  with pytest.raises(ValueError, match="allowed"):
    cuma_jax.profile_field(source, "nationality")


def test_figures_draw_the_numbers_they_are_given(trained):
  import matplotlib

  matplotlib.use("Agg")
  from cuma_jax import figures

  workdir, experiment = trained
  usage = cuma_jax.routing_usage(experiment, "test")
  label = cuma_jax.latent_culture(experiment.data.oracle)
  groups = cuma_jax.usage_by_group(usage, label)
  figure = figures.cultural_topology(groups)
  names = sorted(groups)
  for ax in figure.axes[: len(usage.usage)]:
    router = ax.get_title()
    expected = np.concatenate([groups[g][router] for g in names])
    np.testing.assert_array_equal(ax.images[0].get_array(), expected)
  # The projection: 2 principal components of the flattened per-profile usage (numpy's SVD
  # on the covariance's eigenvectors, up to sign).
  figure = figures.routing_projection(usage, label)
  points = np.concatenate([c.get_offsets() for c in figure.axes[0].collections])
  flat = np.concatenate(
    [usage.usage[r].reshape(len(usage.profiles), -1) for r in sorted(usage.usage)], 1
  )
  centred = flat - flat.mean(0)
  eigenvalues = np.linalg.eigvalsh(centred.T @ centred)[::-1][:2]
  np.testing.assert_allclose(np.var(points, 0) * len(points), eigenvalues, rtol=1e-4, atol=1e-9)
  records = figures.read_metrics(os.path.join(workdir, "train", "metrics.jsonl"))
  figure = figures.training_curves({"CuMA": records}, keys=("loss",))
  (line,) = figure.axes[0].lines
  np.testing.assert_array_equal(line.get_ydata(), [r["loss"] for r in records])
