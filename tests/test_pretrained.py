"""Loading from a checkpoint directory: the tokenizer, chat template included; the model's
traces reused within a process."""

from flax import traverse_util
import flax.linen as nn
import helpers
import jax
import jax.numpy as jnp

from cuma_jax.layers import adapter
from cuma_jax.layers.adapter_config import AdapterConfig
from cuma_jax.models.config import ModelConfig
from cuma_jax.models.pretrained import (
  abstract_params,
  build_decoder,
  init_adapter_params,
  load_tokenizer,
)


def test_tokenizer_loads_from_the_checkpoint_directory(tmp_path):
  fast = helpers.word_level_tokenizer({"<unk>": 0, "hello": 1, "world": 2}, "<unk>")
  fast.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
  fast.save_pretrained(tmp_path)
  loaded = load_tokenizer(tmp_path)
  assert loaded.encode("hello world", add_special_tokens=False) == [1, 2]
  assert (
    loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user]hi"
  )


def _router_of_width(width, traces):
  """A router kind whose one parameter has ``width`` entries; counts its traces."""

  class Router(nn.Module):
    num_experts: int

    @nn.compact
    def __call__(self, x, z, deterministic=True):
      traces.append(width)
      probe = self.param("probe", nn.initializers.normal(1.0), (width,))
      return jnp.zeros((*x.shape[:-1], self.num_experts)) + probe.sum()

  make = lambda num_experts, name, **_: Router(num_experts, name=name)  # noqa: E731
  return adapter.RouterKind(make, reads_demographics=False)


def test_a_models_trace_is_reused_until_a_variant_is_registered_again(tiny_checkpoint):
  # The shapes and adapter initialisation of a model are traced once per process; a router
  # redefined under the same name (a notebook cell run again) is traced afresh.
  directory, _ = tiny_checkpoint("qwen3")
  config = ModelConfig.from_pretrained(directory)
  traces = []
  adapter.ROUTERS.register("test_probe", _router_of_width(3, traces))
  try:
    cfg = AdapterConfig(targets=("q_proj",), num_experts=2, top_k=1, router="test_probe")
    probe = ("layers_0", "self_attn", "adapters_in", "q_proj_router", "probe")

    def probe_shapes():
      module = build_decoder(config, adapter=cfg)  # a new, equal module each time
      shapes = nn.unbox(abstract_params(module))
      initial = init_adapter_params(module, jax.random.key(0))
      return (
        traverse_util.flatten_dict(shapes)[probe].shape,
        traverse_util.flatten_dict(initial)[probe].shape,
      )

    assert probe_shapes() == ((3,), (3,))
    traced = len(traces)
    assert probe_shapes() == ((3,), (3,)) and len(traces) == traced  # no new trace
    adapter.ROUTERS.unregister("test_probe")
    adapter.ROUTERS.register("test_probe", _router_of_width(5, traces))
    assert probe_shapes() == ((5,), (5,))
  finally:
    adapter.ROUTERS.unregister("test_probe")
