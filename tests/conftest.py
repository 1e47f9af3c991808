"""Shared fixtures: tiny random Hugging Face models built locally (no download)."""

import os

# Tests that build a mesh need several host devices; this must precede importing jax.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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
