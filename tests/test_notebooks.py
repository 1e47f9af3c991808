"""The notebooks of colab/ run top to bottom with tiny settings, as CI runs them.

Each runs through ``colab/execute.py`` (nbclient, a kernel of this interpreter) with the
tiny presets in place of the demo ones, and in place of hub downloads, a tiny random Qwen3
and the hand-written WorldValuesBench fixture. Any cell that raises fails the test.

The survey notebooks start from the session's run of the main job (`main_job`, the same
preset) instead of repeating it: the quickstart resumes a copy of that finished run, and
fork_the_router's shared inputs are its prepared survey and warmed-up tiny backbone, and its
unchanged CuMA (the same preset and steps) resumes a copy of it, so the two variants (trained
from scratch in the kernel) are all that trains. The preference notebook
starts from the data, backbone and SFT stage of the session's preference run
(`preference_run`, the same preset): its SFT-only run resumes that stage and evaluates it, and
its DPO stage, added to that finished run, trains in the kernel.
"""

import importlib.util
import json
import os
import re
import shutil

import nbformat
import pytest

from cuma_jax import presets
from cuma_jax.tiny.backbone import write_random_qwen3

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")
NOTEBOOKS = ("quickstart", "tpu_qwen3", "fork_the_router", "preference")

_spec = importlib.util.spec_from_file_location("execute", os.path.join(COLAB, "execute.py"))
execute = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute)


def _read(name):
  return nbformat.read(os.path.join(COLAB, f"{name}.ipynb"), as_version=4)


def _run(name, tmp_path, **parameters):
  """Executes colab/<name>.ipynb with ``parameters`` (Python values) in ``tmp_path``."""
  return execute.execute(
    os.path.join(COLAB, f"{name}.ipynb"),
    {key: repr(value) for key, value in parameters.items()},
    cwd=str(tmp_path),
    timeout=600,
    output=str(tmp_path / f"{name}.executed.ipynb"),
  )


def _outputs(notebook, kind):
  """Every output of the executed notebook with data of MIME type ``kind``."""
  return [
    output["data"][kind]
    for cell in notebook.cells
    if cell.cell_type == "code"
    for output in cell.outputs
    if kind in output.get("data", {})
  ]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean_and_installs_from_the_repository(name):
  notebook = _read(name)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert all(not cell.outputs and cell.execution_count is None for cell in code)
  assert "pip" in code[0].source and "git+https://github.com/cuma-jax/cuma_jax" in code[0].source
  assert execute.parameters_cell(notebook) == notebook.cells.index(code[1])
  assert f"colab/{name}.ipynb" in notebook.cells[0].source  # its Open in Colab badge
  with open(os.path.join(ROOT, "README.md")) as f:
    assert f"blob/main/colab/{name}.ipynb" in f.read()


def test_unknown_or_malformed_parameters_are_refused_before_a_kernel_starts():
  notebook = _read("quickstart")
  assert execute.parameter_names(notebook) == (
    "PRESET",
    "WORKDIR",
    "NUM_STEPS",
    "BASELINES",
    "FIGURES_DIR",
  )
  with pytest.raises(ValueError, match=re.escape("parameters ['STEPS'] are not in")):
    execute.with_parameters(notebook, {"STEPS": "3"})
  with pytest.raises(SyntaxError):
    execute.with_parameters(notebook, {"NUM_STEPS": "3 +"})
  injected = execute.with_parameters(notebook, {"NUM_STEPS": "3"})
  cell = injected.cells[execute.parameters_cell(notebook) + 1]
  assert cell.source.endswith("NUM_STEPS = 3\n") and len(injected.cells) == len(notebook.cells) + 1


def test_quickstart(main_job, tmp_path):
  # The main job's finished run, with its steps and baseline: the notebook resumes and
  # evaluates it.
  _, main_workdir = main_job
  shutil.copytree(main_workdir, tmp_path / "run")
  figures = tmp_path / "figures"
  notebook = _run(
    "quickstart",
    tmp_path,
    PRESET="tiny",
    WORKDIR="run",
    NUM_STEPS=3,
    BASELINES=("lora",),
    FIGURES_DIR="figures",
  )
  expected = {
    "training_curves.png",
    "metrics.png",
    "cultural_topology.png",
    "routing_by_profile.png",
  }
  assert set(os.listdir(figures)) == expected
  assert all((figures / f).stat().st_size > 5000 for f in expected)
  assert len(_outputs(notebook, "image/png")) == len(expected)
  # The printed table has every model of both splits, with the results.json numbers.
  (table,) = _outputs(notebook, "text/markdown")
  with open(tmp_path / "run" / "results.json") as f:
    results = json.load(f)
  cuma = results["trained"]["zero_shot"]["model"]
  assert f"| zero_shot | CuMA | {cuma['accuracy']:.4f} |" in table
  lora = results["baselines"]["lora"]["test"]["model"]
  assert f"| test | lora | {lora['accuracy']:.4f} |" in table


def test_fork_the_router(main_job, tmp_path):
  _, main_workdir = main_job
  for name in ("tfds", "assets"):  # the shared inputs, as `cuma_jax.prepare` leaves them
    shutil.copytree(main_workdir / name, tmp_path / "run" / "shared" / name)
  # The notebook's plain CuMA is the main job's run (the same preset and steps): it resumes
  # that finished run and evaluates it.
  shutil.copytree(main_workdir, tmp_path / "run" / "CuMA")
  notebook = _run("fork_the_router", tmp_path, PRESET="tiny", NUM_STEPS=3, WORKDIR="run")
  (table,) = _outputs(notebook, "text/markdown")
  for variant, gate, router in (
    ("sparsemax_gate", "sparsemax", "token_and_demographics"),
    ("cosine_router", "softmax_top_probs", "cosine"),
  ):
    with open(tmp_path / "run" / variant / "results.json") as f:
      results = json.load(f)
    adapter = results["run"]["config"]["adapter"]
    assert (adapter["gate"], adapter["router"]) == (gate, router)
    name = variant.replace("_", " ")
    assert f"| test | {name} | {results['trained']['test']['model']['accuracy']:.4f} |" in table
  # Two figures (topology, projection) per variant, and the metric bars.
  assert len(_outputs(notebook, "image/png")) == 7


def test_preference(preference_run, tmp_path):
  _, preference_workdir = preference_run
  for name in ("tfds", "assets", "sft"):
    shutil.copytree(preference_workdir / name, tmp_path / "run" / name)
  notebook = _run("preference", tmp_path, PRESET="preference_tiny", WORKDIR="run", EXAMPLES=2)
  tables = _outputs(notebook, "text/markdown")
  assert len(tables) == 2
  with open(tmp_path / "run" / "results.json") as f:
    results = json.load(f)
  assert results["run"]["config"]["preference"]["stages"] == ["sft", "dpo"]
  assert f"| after SFT + DPO | {results['trained']['win_rate']['win_rate']:.4f} |" in tables[0]
  assert len(tables[1].splitlines()) == 2 + 2  # header, rule and one row per example
  assert len(_outputs(notebook, "image/png")) == 3


@pytest.fixture
def tiny_qwen3(chat_tokenizer, tmp_path):
  """A tiny random Qwen3 whose tokenizer covers the WorldValuesBench fixture's text."""
  section = presets.experiment_config("cuma", "tiny").tiny_backbone
  return write_random_qwen3(str(tmp_path / "tiny_qwen3"), chat_tokenizer("qwen3"), section)


def test_tpu_qwen3(tmp_path, tiny_qwen3, wvb_root):
  notebook = _run(
    "tpu_qwen3",
    tmp_path,
    MODELS={"tiny-qwen3": tiny_qwen3},
    ENCODER=tiny_qwen3,
    BATCH_SIZES=(8,),
    WVB_DIR=str(wvb_root),
    WORKDIR=str(tmp_path / "run"),
    MODELS_DIR=str(tmp_path / "models"),
    NUM_STEPS=2,
    CHECKPOINT_EVERY=1,
    ROUTING_EXAMPLES=16,
    OVERRIDES={"data.max_length": 256, "eval.batch_size": 8},
    MEMORY_GIB=1.0,
    MOUNT_DRIVE=False,
  )
  assert not os.path.exists(tmp_path / "models")  # nothing downloaded
  with open(tmp_path / "run" / "plan.json") as f:
    assert json.load(f)["choice"] == {"model": "tiny-qwen3", "batch_size": 8}
  text = "".join(
    output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
  )
  assert "| train step |" in text and "training tiny-qwen3 with batches of 8" in text
  assert len(_outputs(notebook, "image/png")) == 2
