"""A tiny Qwen3-shaped backbone built locally, for the embedded default job (no download).

The random network is written as an ordinary Hugging Face checkpoint (config.json +
safetensors) through the same export path as real models, so everything downstream —
``load_pretrained``, the demographic encoder, the trainer — runs unchanged on it.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import transformers

from cuma_jax.api import build_decoder, dummy_inputs, save_pretrained
from cuma_jax.models.config import ModelConfig

TINY_QWEN3 = dict(
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=16,
  max_position_embeddings=512,
  rms_norm_eps=1e-6,
  rope_theta=10000.0,
  tie_word_embeddings=True,
)


def write_random_qwen3(directory: str, tokenizer, *, seed: int = 0, **overrides) -> str:
  """Saves a randomly initialised tiny Qwen3 (and ``tokenizer``) to ``directory``."""
  hf_config = transformers.Qwen3Config(
    **{**TINY_QWEN3, **overrides},
    vocab_size=len(tokenizer),
    pad_token_id=tokenizer.pad_token_id,
    eos_token_id=tokenizer.eos_token_id,
  )
  config = dataclasses.replace(
    ModelConfig.from_hf(hf_config), hf_config_json=hf_config.to_json_string()
  )
  module = build_decoder(config)
  params = nn.unbox(module.init(jax.random.key(seed), **dummy_inputs(module))["params"])
  save_pretrained(module, params, directory)
  tokenizer.save_pretrained(directory)
  return directory


def is_checkpoint(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, "config.json")) and any(
    f.endswith(".safetensors") for f in os.listdir(directory)
  )
