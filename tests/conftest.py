"""Session fixtures: everything expensive is built once per test run.

Tiny random Hugging Face models (no download), their JAX loads, the hand-written
WorldValuesBench directory, the tiny chat tokenizers, the synthetic TFDS survey, and one run
each of the main job on the `tiny` preset and of the preference task on `preference_tiny`
(`JOBS`: started in the background by the controlling process when the session starts, and
read by every test process; only when a file that reads them is selected).

The suite runs in parallel (`pytest -n auto`: one pytest-xdist worker per core); the
session fixtures are built once per worker, the jobs once per session.

Compilation is most of the suite's time, so:
- compilations are cached on disk for the session (JAX's persistent compilation cache in a
  temporary directory): a function traced again with the same shapes (every
  `load_pretrained` with the same adapter, every training run of the same config, the main
  job's evaluations) is compiled once, by whichever worker gets there first.  Set ``JAX_COMPILATION_CACHE_DIR`` to keep the cache
  between runs;
- XLA:CPU skips its costly optimisation passes (``platforms.FAST_CPU_COMPILE_FLAGS``; an
  ``XLA_FLAGS`` already in the environment is left as it is).
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from cuma_jax.platforms import FAST_CPU_COMPILE_FLAGS

# Tests that build a mesh need several host devices; this must precede importing jax.
os.environ.setdefault(
  "XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_CPU_COMPILE_FLAGS}"
)
# CPU only: libtpu (in the test extra, for ahead-of-time TPU compilation) is not a device,
# and each test process may load it (it takes a lock file otherwise).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# In the environment, so that subprocesses share it.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cuma-tests-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from cuma_jax.data import builders, prompts  # noqa: E402, F401  (builders registers the TFDS datasets)
from cuma_jax.data.wvb import WvbReader  # noqa: E402
from cuma_jax.models.pretrained import load_pretrained  # noqa: E402
from cuma_jax.tiny.tokenizer import build_tiny_tokenizer  # noqa: E402
from cuma_jax.tiny.wvb_fixture import write_wvb_fixture  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tfds.disable_progress_bar()


def pytest_unconfigure(config):
  _stop_jobs(config)
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# ----------------------------------------------------------------------------- tiny models

TINY = dict(
  vocab_size=96,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=8,
  max_position_embeddings=64,
  rms_norm_eps=1e-6,
)

# name -> (config class, causal LM class, extra config fields)
TINY_MODELS = {
  "qwen3": (
    transformers.Qwen3Config,
    transformers.Qwen3ForCausalLM,
    dict(tie_word_embeddings=False, rope_theta=10000.0),
  ),
  "qwen3_tied": (
    transformers.Qwen3Config,
    transformers.Qwen3ForCausalLM,
    dict(tie_word_embeddings=True, attention_bias=True),
  ),
  "llama3": (
    transformers.LlamaConfig,
    transformers.LlamaForCausalLM,
    dict(
      tie_word_embeddings=False,
      # Weights 5x Hugging Face's default std: positions then matter (a decoder without RoPE
      # is off by over 100x the parity tolerance) and so does every MLP (zeroing one moves
      # the logits by more than their spread); test_decoder asserts both margins.
      initializer_range=0.1,
      rope_theta=500000.0,
      rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
      },
    ),
  ),
  "llama_tied_bias": (
    transformers.LlamaConfig,
    transformers.LlamaForCausalLM,
    dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True, num_key_value_heads=4),
  ),
}


def build_tiny_model(name, directory, seed=0):
  """Saves a randomly initialised tiny model (float32) with save_pretrained."""
  config_cls, model_cls, extra = TINY_MODELS[name]
  torch.manual_seed(seed)
  config = config_cls(**{**TINY, **extra})
  model = model_cls(config).eval()
  # Non-trivial norm weights so that a missed norm cannot pass unnoticed.
  with torch.no_grad():
    for param_name, param in model.named_parameters():
      if "norm" in param_name or "bias" in param_name:
        param.uniform_(0.5, 1.5) if "norm" in param_name else param.normal_(0, 0.1)
  model.save_pretrained(directory)
  return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
  """Returns a function name -> (directory, torch model), cached per session.

  The torch model is shared: a test that changes it (dtype, weights) works on a copy.
  """
  cache = {}

  def get(name):
    if name not in cache:
      directory = tmp_path_factory.mktemp(name)
      cache[name] = (str(directory), build_tiny_model(name, directory))
    return cache[name]

  return get


@pytest.fixture(scope="session")
def pretrained(tiny_checkpoint):
  """Returns a function (name, **load_pretrained kwargs) -> (module, params), cached per session.

  Parameters are immutable arrays; each call gets its own (shallow) copy of the dicts.
  """
  cache = {}

  def hashable(value):
    if isinstance(value, jax.Array):  # e.g. rng: a key is cached by its bits.
      if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        value = jax.random.key_data(value)
      return (str(value.dtype), tuple(np.asarray(value).ravel().tolist()))
    return value

  def get(name, **kwargs):
    key = (name, tuple(sorted((k, hashable(v)) for k, v in kwargs.items())))
    if key not in cache:
      cache[key] = load_pretrained(tiny_checkpoint(name)[0], **kwargs)
    module, params = cache[key]
    return module, jax.tree.map(lambda x: x, params)

  return get


# ----------------------------------------------------------------------------- data


@pytest.fixture(scope="session")
def wvb_root(tmp_path_factory):
  """The hand-written WorldValuesBench manual directory (`cuma_jax.tiny.wvb_fixture`)."""
  return write_wvb_fixture(tmp_path_factory.mktemp("wvb"))


@pytest.fixture(scope="session")
def wvb_examples(wvb_root):
  """Every example the reader gives for the fixture's train, valid and test splits."""
  reader = WvbReader(wvb_root)
  return [e for split in ("train", "valid", "test") for e in reader.examples(split)]


@pytest.fixture(scope="session")
def chat_tokenizer(wvb_examples, tmp_path_factory):
  """Returns a function chat_format -> tiny tokenizer built from the fixture's text, cached.

  Each is reloaded from disk with AutoTokenizer, as users will.
  """
  cache = {}

  def get(chat_format):
    if chat_format not in cache:
      corpus = [e["user"] for e in wvb_examples] + [e["profile"] for e in wvb_examples]
      out = tmp_path_factory.mktemp(chat_format)
      build_tiny_tokenizer([*corpus, prompts.DEFAULT_SYSTEM_PROMPT], out, chat_format=chat_format)
      cache[chat_format] = transformers.AutoTokenizer.from_pretrained(out)
    return cache[chat_format]

  return get


@pytest.fixture(scope="session")
def synthetic_sources(tmp_path_factory):
  """The `tiny` config of the synthetic survey, prepared with TFDS (array_record)."""
  return tfds.data_source("cuma_synthetic_survey/tiny", data_dir=tmp_path_factory.mktemp("tfds"))


# ----------------------------------------------------------------------------- the jobs

# The runs of `python -m cuma_jax.main` that several test files read: name -> (arguments,
# the test files that read it, its XLA_FLAGS). The controlling process starts each, in the
# background, when the command line selects one of its files; the session fixture of the same
# name waits for it.
JOBS = {
  "main_job": (
    (
      f"--config={ROOT}/configs/cuma.py:tiny",
      "--config.train.num_steps=3",
      "--config.eval.baselines=('lora',)",
    ),
    (
      "test_analysis.py",
      "test_job.py",
      "test_loop.py",
      "test_main.py",
      "test_registry.py",
      "test_sharding.py",
      "test_multihost.py",
      "test_interop.py",
      "test_fork.py",
      "test_notebooks.py",
    ),
    FAST_CPU_COMPILE_FLAGS,  # one host device, as a user runs it
  ),
  # The preference task on `preference_tiny`: every stage, the LoRA baseline.
  "preference_run": (
    (f"--config={ROOT}/configs/cuma.py:preference_tiny",),
    ("test_alignment.py", "test_notebooks.py"),
    os.environ["XLA_FLAGS"],  # the test processes' eight host devices
  ),
}


def _env_name(job: str) -> str:
  """Where the controlling process tells the test processes (xdist workers) about a run."""
  return f"CUMA_TESTS_{job.upper()}_DIR"


def _selects(config, files) -> bool:
  """Whether the paths on the command line include one of ``files`` (whose tests are all
  marked slow, so ``-m "not slow"`` never starts a job)."""
  if "not slow" in (config.getoption("markexpr") or ""):
    return False
  paths = [arg.split("::")[0] for arg in config.args] or ["."]
  for path in paths:
    path = os.path.abspath(path)
    if os.path.isdir(path) or os.path.basename(path) in files:
      return True
  return False


def pytest_configure(config):
  """The controlling process starts the jobs the selected tests read, once for every test
  process.

  Each runs in its own process (one host device, as a user runs it) while the tests run;
  its fixture waits for the file holding its exit status.
  """
  config.jobs = {}
  if hasattr(config, "workerinput"):
    return  # an xdist worker: the controlling process has started them
  for job, (args, files, xla_flags) in JOBS.items():
    if not _selects(config, files):
      continue
    base = tempfile.mkdtemp(prefix=f"cuma-tests-{job.replace('_', '-')}-")
    command = [sys.executable, "-m", "cuma_jax.main", *args, f"--workdir={base}/run"]
    script = (
      '"$@" >stdout.txt 2>stderr.txt; echo $? >returncode.tmp && mv returncode.tmp returncode'
    )
    config.jobs[job] = subprocess.Popen(
      ["sh", "-c", script, "sh", *command],
      cwd=base,
      env=dict(os.environ, XLA_FLAGS=xla_flags, PYTHONPATH=ROOT),
    )
    os.environ[_env_name(job)] = base


def _stop_jobs(config):
  for job, proc in getattr(config, "jobs", {}).items():
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    shutil.rmtree(os.environ.pop(_env_name(job)), ignore_errors=True)


def _finished(job: str):
  """The finished run ``job``: (CompletedProcess, workdir)."""
  base = os.environ.get(_env_name(job))
  assert base, f"{job} was not started: name one of {JOBS[job][1]} or a directory"
  returncode = os.path.join(base, "returncode")
  deadline = time.monotonic() + 900
  while not os.path.exists(returncode):
    assert time.monotonic() < deadline, f"{job} did not finish in 900 s"
    time.sleep(0.5)
  read = lambda name: pathlib.Path(base, name).read_text()  # noqa: E731
  args = [sys.executable, "-m", "cuma_jax.main", *JOBS[job][0]]
  completed = subprocess.CompletedProcess(
    args, int(read("returncode")), read("stdout.txt"), read("stderr.txt")
  )
  return completed, pathlib.Path(base) / "run"


@pytest.fixture(scope="session")
def main_job():
  """The finished main-job run: (CompletedProcess, workdir).

  Its workdir also holds the prepared survey (`tfds/`) and the warmed-up tiny backbone
  (`assets/backbone`) that the training-loop tests reuse.
  """
  return _finished("main_job")


@pytest.fixture(scope="session")
def preference_run():
  """The finished preference run (`preference_tiny`): (CompletedProcess, workdir), with its
  prepared data (`tfds/`) and warmed-up tiny backbone (`assets/`)."""
  proc, workdir = _finished("preference_run")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc, workdir
