"""A variant's own parameters: declared with its registration, set by
``adapter.router_kwargs`` / ``adapter.gate_kwargs``, range-checked, passed to the module (the
routing compared with numpy), recorded in full and classed for resume like the adapter's keys."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cuma_jax import fields, presets, schema
from cuma_jax.fields import field
from cuma_jax.layers import adapter, routing
from cuma_jax.layers.adapter_config import AdapterConfig
from cuma_jax.layers.group import AdapterGroup
from cuma_jax.sharding import EMBED
from cuma_jax.training import checkpointing

B, T, D_IN, D_DEMO, D_OUT, N, K = 3, 5, 6, 4, 7, 5, 2
RNG = np.random.default_rng(0)
X = RNG.normal(size=(B, T, D_IN)).astype(np.float32)
Z = RNG.normal(size=(B, D_DEMO)).astype(np.float32)
MASK = np.ones((B, T), np.float32)


@dataclasses.dataclass(frozen=True)
class PowerParams:
  # Exponent of the top-k probabilities before they are renormalised.
  power: float = field(2.0, low=0, low_open=True)


def power_gate(top_logits, top_probs, temperature, params):
  del top_logits, temperature
  p = top_probs**params.power
  return p / p.sum(-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class ProfileParams:
  # Width of the hidden layer.
  hidden: int = field(3, low=1)
  # Divides the logits.
  temperature: float = field(1.0, low=0, low_open=True)


class ProfileRouter(nn.Module):
  """logits [B, 1, N] = Dense(relu(Dense(z))) / temperature."""

  num_experts: int
  params: ProfileParams
  hidden_dims: tuple = ()
  dropout: float = 0.0
  in_axis: str = ""
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, z, deterministic=True):
    h = jax.nn.relu(nn.Dense(self.params.hidden, name="hidden")(z))
    return (nn.Dense(self.num_experts, name="out")(h) / self.params.temperature)[:, None, :]


@pytest.fixture(scope="module", autouse=True)
def registered():
  routing.register_gate("test_power", params=PowerParams)(power_gate)
  adapter.register_router("test_profile", reads_demographics=True, params=ProfileParams)(
    ProfileRouter
  )
  yield
  routing.GATES.unregister("test_power")
  adapter.ROUTERS.unregister("test_profile")


def _adapter(**kwargs):
  return AdapterConfig(
    targets=("q_proj",),
    num_experts=N,
    top_k=K,
    demographic_dim=D_DEMO,
    router="test_profile",
    gate="test_power",
    **kwargs,
  )


def _numpy_routing(p, z, hidden, temperature, power):
  """The router and gate written again in numpy: experts and gates per sequence."""
  assert p["hidden"]["kernel"].shape == (D_DEMO, hidden)
  h = np.maximum(z @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0.0)
  logits = (h @ p["out"]["kernel"] + p["out"]["bias"]) / temperature
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  experts = np.argsort(-probs, -1, kind="stable")[:, :K]
  top = np.take_along_axis(probs, experts, -1) ** power
  return experts, top / top.sum(-1, keepdims=True)


@pytest.mark.parametrize("kwargs", [{}, {"hidden": 7, "temperature": 0.25, "power": 4}])
def test_the_parameters_reach_the_router_and_the_gate(kwargs):
  own = {k: v for k, v in kwargs.items() if k != "power"}
  gate_kwargs = {"power": kwargs["power"]} if "power" in kwargs else {}
  cfg = _adapter(router_kwargs=own, gate_kwargs=gate_kwargs)
  assert cfg.router_kwargs == ProfileParams(**own) and cfg.gate_kwargs == PowerParams(**gate_kwargs)
  group = AdapterGroup(
    adapter=cfg, group="attn_in", dtype=np.float32, deterministic=True, capture_routing=True
  )
  outputs = {"q_proj": (D_OUT, EMBED)}
  variables = group.init(jax.random.PRNGKey(0), X, Z, MASK, outputs, EMBED)
  _, aux = group.apply(variables, X, Z, MASK, outputs, EMBED)
  params = jax.tree.map(np.asarray, nn.unbox(variables)["params"]["q_proj_router"])
  experts, gates = _numpy_routing(
    params, Z, own.get("hidden", 3), own.get("temperature", 1.0), kwargs.get("power", 2.0)
  )
  decided = aux["routing"]["q_proj"]
  np.testing.assert_array_equal(decided["experts"], np.repeat(experts[:, None], T, 1))
  np.testing.assert_allclose(decided["gates"], np.repeat(gates[:, None], T, 1), rtol=1e-5)


def _tiny(**overrides):
  return presets.experiment_config(
    "cuma",
    "tiny",
    overrides={
      "adapter.router": "test_profile",
      "adapter.gate": "test_power",
      "eval.baselines": (),
      **overrides,
    },
  )


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("hidden", 0, r"config\.adapter\.router_kwargs\.hidden=0; must be >= 1$"),
    ("temperature", 0.0, r"config\.adapter\.router_kwargs\.temperature=0\.0; must be .*> 0"),
    ("hidden", 2.5, r"config\.adapter\.router_kwargs\.hidden=2\.5; must be of type int"),
    (
      "width",
      8,
      r"config\.adapter\.router_kwargs\.width is not a parameter of router kind "
      r"'test_profile'; it has \['hidden', 'temperature'\]",
    ),
  ],
)
def test_a_bad_parameter_is_refused_naming_the_key_and_what_is_allowed(key, value, message):
  with pytest.raises(ValueError, match=message):
    _tiny(**{f"adapter.router_kwargs.{key}": value})
  assert schema.unknown_key(f"adapter.router_kwargs.{key}") is None  # validation names it


@dataclasses.dataclass(frozen=True)
class Band:
  low: float = field(0.0)
  high: float = field(1.0)

  def validate(self):
    if self.low >= self.high:
      raise ValueError(f"config.adapter.gate_kwargs.low={self.low}; must be below high={self.high}")


def test_a_validate_method_checks_across_fields():
  assert fields.params_of(Band, {"low": 0.5}, "adapter.gate_kwargs", "gate 'band'") == Band(0.5)
  with pytest.raises(ValueError, match=r"^config\.adapter\.gate_kwargs\.low=2\.0; must be below"):
    fields.params_of(Band, {"low": 2.0}, "adapter.gate_kwargs", "gate 'band'")


def test_a_variant_without_parameters_takes_none():
  with pytest.raises(ValueError, match=r"router_kwargs\.hidden is not a parameter of .*'token'"):
    AdapterConfig(router="token", router_kwargs={"hidden": 3})
  with pytest.raises(ValueError, match=r"gate_kwargs\.power is not a parameter of gate 'top_"):
    _tiny(**{"adapter.gate": "top_probs", "adapter.gate_kwargs.power": 3.0})


def test_the_parameters_are_recorded_in_full_and_read_back():
  c = _tiny(**{"adapter.router_kwargs.hidden": 5, "adapter.gate_kwargs.power": 3})
  # Defaults are written out, and an int given for a float field is recorded as the float.
  assert c.adapter.router_kwargs.to_dict() == {"hidden": 5, "temperature": 1.0}
  assert c.adapter.gate_kwargs.to_dict() == {"power": 3.0}
  assert isinstance(c.adapter.gate_kwargs.power, float)
  recorded = checkpointing.config_to_json(schema.validate(c))
  assert recorded["adapter"]["router_kwargs"] == {"hidden": 5, "temperature": 1.0}
  typed = schema.from_dict(json.loads(json.dumps(recorded)))
  assert typed.adapter == schema.validate(c).adapter
  assert typed.adapter.router_kwargs == ProfileParams(hidden=5)
  # The default router's section is empty and stays so.
  assert presets.experiment_config("cuma", "tiny").adapter.router_kwargs.to_dict() == {}


def test_changing_a_parameter_is_refused_on_resume_like_an_adapter_key():
  saved = checkpointing.config_to_json(
    schema.validate(_tiny(**{"adapter.router_kwargs.hidden": 5}))
  )
  assert schema.resume_class("adapter.router_kwargs.hidden") == schema.resume_class("adapter.rank")
  changed = _tiny(**{"adapter.router_kwargs.hidden": 6}).to_dict()
  assert schema.resume_conflicts(saved, changed) == [
    "adapter.router_kwargs.hidden: 5 -> 6 (identity)"
  ]
  # Unset parameters compare as their defaults, whichever side left them out.
  hand_written = ml_collections.ConfigDict(saved).to_dict()
  hand_written["adapter"]["router_kwargs"] = {"hidden": 5}
  assert schema.resume_conflicts(saved, hand_written) == []
  assert schema.resume_conflicts(hand_written, saved) == []
  sharper = _tiny(**{"adapter.router_kwargs.hidden": 5, "adapter.gate_kwargs.power": 3.0})
  assert schema.resume_conflicts(saved, sharper.to_dict()) == [
    "adapter.gate_kwargs.power: 2.0 -> 3.0 (identity)"
  ]


def test_changing_the_variant_drops_the_old_variant_s_parameters():
  c = ml_collections.ConfigDict(_tiny(**{"adapter.router_kwargs.hidden": 5}).to_dict())
  presets.apply_overrides(c, {"adapter.router": "token_and_demographics"})
  assert c.adapter.router_kwargs.to_dict() == {}
  schema.validate(c)
  # The baseline of a forked run takes its own method's router.
  b = presets.baseline_config(
    schema.validate(_tiny(**{"adapter.router_kwargs.hidden": 5})),
    "lora",
    backbone="b",
    data_dir="d",
  )
  assert b.adapter.router == "none" and b.adapter.router_kwargs == fields.NoParams()


# --- adapter.plugins: a fork's module, imported before the config is checked. ---------------

PLUGIN = """
import dataclasses
from cuma_jax.fields import field
from cuma_jax.layers import routing


@dataclasses.dataclass(frozen=True)
class Params:
  power: float = field(2.0, low=0, low_open=True)


@routing.register_gate("{name}", params=Params)
def gate(top_logits, top_probs, temperature, params):
  return top_probs**params.power / (top_probs**params.power).sum(-1, keepdims=True)
"""


def test_a_plugin_is_imported_before_the_config_is_checked(tmp_path, monkeypatch):
  (tmp_path / "my_fork_gate.py").write_text(PLUGIN.format(name="test_plugin_gate"))
  monkeypatch.syspath_prepend(str(tmp_path))
  try:
    with pytest.raises(
      ValueError,
      match=r"^config\.adapter\.gate='test_plugin_gate' is not a registered gate; registered: "
      r"\(.*\); a variant defined in your own module is registered when that module is "
      r"listed in config\.adapter\.plugins$",
    ):
      AdapterConfig(gate="test_plugin_gate")
    c = AdapterConfig(gate="test_plugin_gate", plugins="my_fork_gate", gate_kwargs={"power": 3})
    assert c.plugins == ("my_fork_gate",) and c.gate_kwargs.power == 3.0
    assert schema.resume_class("adapter.plugins") == "free"  # they only name where code is
  finally:
    routing.GATES.unregister("test_plugin_gate")


@pytest.mark.parametrize(
  "source, error",
  [
    (None, "ModuleNotFoundError: No module named"),
    ("def broken(:\n", "SyntaxError: "),
    ("raise RuntimeError('the fork is broken\\nat length')\n", "RuntimeError: the fork is broken)"),
  ],
)
def test_a_plugin_that_fails_to_import_is_named_in_one_line(tmp_path, monkeypatch, source, error):
  name = "test_plugin_that_fails"
  if source is not None:
    (tmp_path / f"{name}.py").write_text(source)
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(ValueError) as refused:
    _tiny(**{"adapter.plugins": (name,)})
  message = str(refused.value)
  assert message.startswith(f"config.adapter.plugins: cannot import '{name}' ({error}")
  assert "\n" not in message and "PYTHONPATH" in message


# --- Help texts: each field's comment, allowed values and default (--helpfull). -------------


@dataclasses.dataclass(frozen=True)
class Commented:
  # Two lines of comment
  # above the field.
  above: int = field(1, low=1)
  trailing: str = field("a", choices=("a", "b"))  # a trailing comment
  spread: tuple[float, ...] = field(
    (0.5,),  # not the field's comment: the line does not start it
    low=0,
  )
  # A comment cut off from the next field by a blank line is not its comment.

  plain: float = field(1.0)


def test_field_comments_are_read_from_the_source():
  assert fields.comments(Commented) == {
    "above": "Two lines of comment above the field.",
    "trailing": "a trailing comment",
    "spread": "",
    "plain": "",
  }


def test_help_texts_give_each_key_s_comment_range_and_default():
  texts = schema.help_texts()
  assert (
    texts["adapter.rank"] == "rank r of each expert: A [d_in, r], B [r, d_out] (>= 1; default 8)"
  )
  assert texts["model.dtype"] == "compute (one of ('float32', 'bfloat16'); default 'bfloat16')"
  assert texts["optim.learning_rate"] == "(>= 0; default 5e-06)"
  # A parameter name several variants declare gives each one's text (a fork registered
  # earlier in this process, e.g. test_fork's 'zonly' router, declares `hidden` too).
  assert "router kind 'test_profile': Width of the hidden layer. (>= 1; default 3)" in (
    texts["adapter.router_kwargs.hidden"].split(" | ")
  )
  assert (
    "gate 'test_power': Exponent of the top-k probabilities before they are renormalised. "
    "(> 0; default 2.0)"
  ) in texts["adapter.gate_kwargs.power"].split(" | ")
  keys = set(schema._flat(schema.as_dict(schema.Config()))) | set(schema.VARIANT_KWARGS)
  assert {k for k in texts if not schema.variant_section(k) or k in keys} == keys
