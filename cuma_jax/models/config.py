"""Architecture description read from a Hugging Face ``config.json``.

The architecture is never copied by hand: :func:`ModelConfig.from_hf` reads it through
``transformers.AutoConfig`` and refuses anything this decoder does not implement, so a
checkpoint that would silently compute something else fails at load time instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu",)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  theta: float
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hashable architecture of a Qwen3 / Llama 3 decoder (usable as a linen attribute)."""

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float
  rope: RopeConfig
  attention_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 4096
  # The checkpoint's own config.json, kept verbatim so export writes it back unchanged.
  hf_config_json: str = dataclasses.field(default="{}", compare=False, repr=False)

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_attention_heads ({self.num_heads}) must be a multiple of "
        f"num_key_value_heads ({self.num_kv_heads})"
      )

  @classmethod
  def from_hf(cls, hf_config: Any) -> ModelConfig:
    """Builds the config from a ``transformers.PretrainedConfig``."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
        f"Unsupported model_type {model_type!r}; supported model types: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}"
      )
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
      raise ValueError(f"Unsupported hidden_act {act!r}; supported: {SUPPORTED_ACTIVATIONS}")
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    return cls(
      model_type=model_type,
      vocab_size=hf_config.vocab_size,
      hidden_size=hf_config.hidden_size,
      intermediate_size=hf_config.intermediate_size,
      num_layers=hf_config.num_hidden_layers,
      num_heads=num_heads,
      num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
      head_dim=head_dim,
      rms_norm_eps=hf_config.rms_norm_eps,
      rope=_rope_from_hf(hf_config),
      attention_bias=bool(getattr(hf_config, "attention_bias", False)),
      mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
      qk_norm=model_type == "qwen3",
      tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
      max_position_embeddings=hf_config.max_position_embeddings,
      hf_config_json=hf_config.to_json_string(use_diff=True),
    )

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike) -> ModelConfig:
    """Reads ``path/config.json`` (a checkpoint directory or the file itself)."""
    import transformers  # Deferred: only loading needs it.

    path = os.fspath(path)
    if os.path.isfile(path):
      with open(path) as f:
        return cls.from_hf(transformers.AutoConfig.for_model(**json.load(f)))
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
      raise FileNotFoundError(f"{path} is not a checkpoint directory: it has no config.json")
    config = cls.from_hf(transformers.AutoConfig.from_pretrained(path, trust_remote_code=False))
    with open(config_path) as f:
      return dataclasses.replace(config, hf_config_json=f.read())


def _rope_from_hf(hf_config: Any) -> RopeConfig:
  # transformers >= 5 folds rope_theta and rope_scaling into rope_parameters.
  params = dict(getattr(hf_config, "rope_parameters", None) or {})
  scaling = getattr(hf_config, "rope_scaling", None)
  if scaling:
    params = {**scaling, **params}
  theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise ValueError(f"Unsupported rope type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
  fields = {f.name for f in dataclasses.fields(RopeConfig)} - {"theta", "rope_type"}
  return RopeConfig(
    theta=float(theta), rope_type=rope_type, **{k: v for k, v in params.items() if k in fields}
  )
