"""AdapterConfig's validation at construction, and the demographics check at call time."""

from helpers import CUMA, D_DEMO, adapter_inputs
import jax.numpy as jnp
import pytest

from cuma_jax.layers.adapter_config import AdapterConfig


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(top_k=0), r"top_k"),
    (dict(top_k=9, num_experts=8), r"top_k"),
    (dict(rank=0), r"rank"),
    (dict(targets=("qkv_proj",)), r"q_proj.*down_proj"),
    (dict(gate="hard"), r"adapter.gate.*softmax_top_probs"),
    (dict(strategy="sparse"), r"strategy.*dense"),
  ],
)
def test_bad_adapter_configs_fail_at_construction(kwargs, message):
  with pytest.raises(ValueError, match=message):
    AdapterConfig(**kwargs)


def test_demographics_shape_is_checked(tiny_checkpoint, pretrained):
  _, torch_model = tiny_checkpoint("qwen3")
  ids, mask, z = adapter_inputs(torch_model.config.vocab_size)
  module, params = pretrained("qwen3", adapter=CUMA)
  for bad in (z[:1], jnp.zeros((2, D_DEMO + 1)), None):
    with pytest.raises(ValueError, match=r"demographic"):
      module.apply({"params": params}, ids, attention_mask=mask, demographics=bad)
