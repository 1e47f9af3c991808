"""Exports of a trained workdir (the command, the model card) and runs that start from one."""

import glob
import json
import os
import shutil
import subprocess
import sys

from flax import traverse_util
from helpers import tiny_config
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import cuma_jax
from cuma_jax import schema
from cuma_jax.checkpoints.adapter_formats import FormatError
from cuma_jax.checkpoints.safetensors_io import TensorIndex
from cuma_jax.models.pretrained import load_pretrained
from cuma_jax.params import filter_tree, is_adapter_path, merge_trees
from cuma_jax.training.checkpointing import CheckpointInputsMismatch

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _backbone(workdir):
  (backbone,) = glob.glob(str(workdir / "assets" / "tiny_backbone_*" / "warmed_up"))
  return backbone


@pytest.fixture(scope="module")
def release_export(main_job, tmp_path_factory):
  """The main job's CuMA run exported by the command line in the released layout."""
  _, workdir = main_job
  out = tmp_path_factory.mktemp("export") / "release"
  args = ["-m", "cuma_jax.export", f"--workdir={workdir}", "--format=cuma_release", f"--out={out}"]
  subprocess.run(
    [sys.executable, *args], check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT)
  )
  return out


def test_the_release_export_lists_its_files_and_a_model_card(main_job, release_export):
  _, workdir = main_job
  names = sorted(os.listdir(release_export))
  for name in ("README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
    assert name in names
  config = json.loads((release_export / "adapter_config.json").read_text())
  assert config["peft_type"] == "CuMA" and config["num_experts"] == 4
  card = (release_export / "README.md").read_text()
  results = json.loads((workdir / "results.json").read_text())
  accuracy = results["trained"]["test"]["model"]["accuracy"]
  for text in (
    _backbone(workdir),
    "Method: cuma",
    "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
    "Rank 8",
    "Experts: 4, top-2",
    "the synthetic survey",
    "Evaluated on: test, zero_shot",
    f"| trained | test | accuracy | {accuracy:.4f} |",
    "python -m cuma_jax.main --config=",
    f"python -m cuma_jax.export --workdir={workdir} --format=cuma_release",
  ):
    assert text in card, text


def test_peft_export_of_the_lora_baseline_loads_in_peft_with_equal_logits(main_job, tmp_path):
  _, workdir = main_job
  with pytest.raises(
    FormatError, match=r"adapter\.router='token_and_demographics'.*baselines/lora"
  ):
    cuma_jax.export_adapters(str(workdir), str(tmp_path / "refused"), "peft")
  assert not (tmp_path / "refused").exists()
  lora = workdir / "baselines" / "lora"
  out = cuma_jax.export_adapters(str(lora), str(tmp_path / "peft"), "peft")
  backbone = _backbone(workdir)
  theirs = peft.PeftModel.from_pretrained(
    transformers.AutoModelForCausalLM.from_pretrained(backbone), out
  ).eval()
  config = json.loads((lora / "results.json").read_text())["run"]["config"]
  adapter = schema.from_dict(config["adapter"], schema.AdapterConfig, "adapter.")
  module, params = load_pretrained(backbone, adapter=adapter)
  native = TensorIndex(lora / "adapters", filename="adapters.safetensors")
  flat = {tuple(n.split("/")): jnp.asarray(native.read(n)) for n in native.names()}
  backbone_params = filter_tree(params, lambda p: not is_adapter_path(p))
  params = merge_trees(backbone_params, traverse_util.unflatten_dict(flat))
  ids = np.random.default_rng(0).integers(0, module.config.vocab_size, size=(2, 12))
  ours, _ = jax.jit(lambda p, i: module.apply({"params": p}, i))(params, jnp.asarray(ids))
  with torch.no_grad():
    expected = theirs(input_ids=torch.tensor(ids)).logits.numpy()
  assert float(np.max(np.abs(np.asarray(ours) - expected))) < 1e-4


def _scalars(by_predictor):
  return {k: v for k, v in by_predictor["model"].items() if isinstance(v, float)}


def test_training_and_evaluation_start_from_an_imported_directory(
  main_job, release_export, tmp_path
):
  """lr 0: training from the imported adapters keeps them, and scores the main job's run."""
  _, workdir = main_job
  source = shutil.copytree(release_export, tmp_path / "source")
  overrides = {
    "train.num_steps": 1,
    "optim.learning_rate": 0.0,
    "model.checkpoint": _backbone(workdir),
    "data.data_dir": str(workdir / "tfds"),
    "eval.baselines": (),
    "adapter.init_from": str(source),
  }
  run = tmp_path / "run"
  results = cuma_jax.run(tiny_config(**overrides), str(run), log=lambda *_: None)
  main = json.loads((workdir / "results.json").read_text())
  for split in ("test", "zero_shot"):
    assert _scalars(results["trained"][split]) == pytest.approx(_scalars(main["trained"][split]))
  imported = TensorIndex(run / "adapters", filename="adapters.safetensors")
  original = TensorIndex(workdir / "adapters", filename="adapters.safetensors")
  assert sorted(imported.names()) == sorted(original.names())
  for name in original.names():
    assert np.array_equal(imported.read(name), original.read(name)), name
  # mode=eval, and restore, of a workdir without checkpoints read the directory's adapters.
  evaluation = tiny_config(**{**overrides, "mode": "eval"})
  results = cuma_jax.run(evaluation, str(tmp_path / "eval"), log=lambda *_: None)
  assert _scalars(results["trained"]["test"]) == pytest.approx(_scalars(main["trained"]["test"]))
  experiment = cuma_jax.restore(str(tmp_path / "eval"), evaluation, log=lambda *_: None)
  q_b = experiment.params["layers_0"]["self_attn"]["adapters_in"]["q_proj_lora"]["b"]
  assert np.array_equal(
    np.asarray(q_b), original.read("layers_0/self_attn/adapters_in/q_proj_lora/b")
  )
  # The directory is an input of the run: other contents are refused on resume.
  with open(source / "README.md", "a") as f:
    f.write("edited")
  with pytest.raises(CheckpointInputsMismatch, match=r"adapter_init \(adapter\.init_from\)"):
    cuma_jax.run(tiny_config(**{**overrides, "mode": "eval"}), str(run), log=lambda *_: None)
