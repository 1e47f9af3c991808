"""A tiny Qwen3-shaped backbone built locally, for the embedded default job (no download).

The random network is written as an ordinary Hugging Face checkpoint (config.json +
safetensors) through the same export path as real models, so everything downstream —
``load_pretrained``, the demographic encoder, the trainer — runs unchanged on it. The
runtime warms it up on the task's data (:func:`cuma_jax.runtime.build_tiny_backbone`).
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import transformers

from cuma_jax.models.config import ModelConfig
from cuma_jax.models.pretrained import build_decoder, dummy_inputs, save_pretrained

# The fixed part of the tiny Qwen3; width and depth come from the ``tiny_backbone`` section.
TINY_QWEN3 = dict(
  head_dim=16,
  max_position_embeddings=512,
  rms_norm_eps=1e-6,
  rope_theta=10000.0,
  tie_word_embeddings=True,
)


def tiny_qwen3_config(tiny_backbone, vocab_size: int, **token_ids) -> transformers.Qwen3Config:
  """The Hugging Face config of the tiny backbone a config's ``tiny_backbone`` section
  describes (``vocab_size``: the trained tokenizer's length, padded up to a multiple of
  ``tiny_backbone.vocab_multiple``)."""
  return transformers.Qwen3Config(
    **{
      **TINY_QWEN3,
      "hidden_size": tiny_backbone.hidden_size,
      "num_hidden_layers": tiny_backbone.num_layers,
      "intermediate_size": 2 * tiny_backbone.hidden_size,
      "num_attention_heads": tiny_backbone.num_heads,
      "num_key_value_heads": tiny_backbone.num_kv_heads,
    },
    vocab_size=-(-vocab_size // tiny_backbone.vocab_multiple) * tiny_backbone.vocab_multiple,
    **token_ids,
  )


def write_random_qwen3(directory: str, tokenizer, tiny_backbone, *, seed: int = 0) -> str:
  """Saves a randomly initialised tiny Qwen3 (and ``tokenizer``) to ``directory``."""
  hf_config = tiny_qwen3_config(
    tiny_backbone,
    len(tokenizer),
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
