"""Shared fixtures: tiny random Hugging Face models built locally (no download).

Compilation, not execution, is most of the suite's time on these tiny programs, so XLA:CPU
skips its costly optimisation passes, and compilations are cached on disk for the session
(JAX's persistent cache in a temporary directory, seen by subprocesses too): a program traced
again with the same shapes is compiled once.  Set ``JAX_COMPILATION_CACHE_DIR`` to keep the
cache between runs.
"""

import os
import shutil
import tempfile

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# Tests that build a mesh need several host devices; this must precede importing jax.
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cuma-tests-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

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
  """Returns a function name -> (directory, torch model), cached per session."""
  cache = {}

  def get(name):
    if name not in cache:
      directory = tmp_path_factory.mktemp(name)
      cache[name] = (str(directory), build_tiny_model(name, directory))
    return cache[name]

  return get


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
