"""The config schema: every field's range, cross-field checks, resume classes."""

import dataclasses
import json
import typing

import ml_collections
import pytest

from cuma_jax import fields, presets, schema


def _tiny():
  return ml_collections.ConfigDict(presets.experiment_config("cuma", "tiny").to_dict())


def _set(c, key, value):
  *path, name = key.split(".")
  for part in path:
    c = c[part]
  c[name] = value


def _numeric_fields(cls=schema.Config, prefix=""):
  """(dotted key, Spec) of every field with a numeric range, nested sections included."""
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    if not f.metadata.get("config", True):
      continue
    if dataclasses.is_dataclass(hints[f.name]):
      yield from _numeric_fields(hints[f.name], f"{prefix}{f.name}.")
    elif fields.spec_of(f).low is not None or fields.spec_of(f).high is not None:
      yield f"{prefix}{f.name}", fields.spec_of(f), hints[f.name]


def _out_of_range(spec, kind):
  """A value just outside the spec, of the field's own type."""
  if spec.low is not None:
    value = spec.low if spec.low_open else spec.low - (1 if "int" in str(kind) else 0.5)
  else:
    value = spec.high if spec.high_open else spec.high + 1
  if "tuple" in str(kind):
    return (value,)
  return int(value) if "int" in str(kind) else float(value)


NUMERIC = list(_numeric_fields())


def test_the_walk_covers_every_section():
  sections = {key.split(".")[0] for key, _, _ in NUMERIC}
  assert sections >= {"adapter", "data", "encoder", "optim", "train", "eval", "tiny_backbone"}
  assert len(NUMERIC) >= 40


@pytest.mark.parametrize("key, spec, kind", NUMERIC, ids=[k for k, _, _ in NUMERIC])
def test_every_numeric_field_refuses_a_value_out_of_range(key, spec, kind):
  c = _tiny()
  bad = _out_of_range(spec, kind)
  _set(c, key, bad)
  with pytest.raises(ValueError, match=rf"config\.{key}="):
    schema.validate(c)


def _float_fields(cls=schema.Config, prefix=""):
  """Dotted key of every float (or tuple-of-float) field, nested sections included."""
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    if not f.metadata.get("config", True):
      continue
    if dataclasses.is_dataclass(hints[f.name]):
      yield from _float_fields(hints[f.name], f"{prefix}{f.name}.")
    elif "float" in str(hints[f.name]):
      yield f"{prefix}{f.name}", "tuple" in str(hints[f.name])


FLOATS = list(_float_fields())


@pytest.mark.parametrize("key, is_tuple", FLOATS, ids=[k for k, _ in FLOATS])
def test_every_float_field_refuses_non_finite_values(key, is_tuple):
  # optim.learning_rate=inf passed validation, then trained parameters to NaN.
  for bad in (float("inf"), float("-inf"), float("nan")):
    c = _tiny()
    _set(c, key, (bad,) if is_tuple else bad)
    with pytest.raises(ValueError, match=rf"config\.{key}=.*must be .*finite"):
      schema.validate(c)


def test_an_unknown_key_is_named_with_the_closest():
  assert schema.unknown_key("optim.learning_rate") is None
  assert schema.unknown_key("optim.learning_rat") == (
    "config.optim.learning_rat is not a config key; the closest are "
    "['optim.learning_rate', 'preference.dpo.learning_rate', 'preference.grpo.learning_rate']"
  )


@pytest.mark.parametrize(
  "key, value",
  [
    # Each reproduced as passing validation before the schema (they failed late or never).
    ("adapter.dropout", 1.5),
    ("adapter.router_dropout", -0.5),
    ("adapter.router_hidden", (0,)),
    ("optim.b1", 1.5),
    ("optim.b2", 2.0),
    ("encoder.max_length", 0),
    ("adapter.gate", "hard"),
    ("adapter.router", "oracle"),
    ("model.remat", "some"),
  ],
)
def test_values_that_used_to_pass_are_refused_naming_the_key(key, value):
  c = _tiny()
  _set(c, key, value)
  with pytest.raises(
    ValueError, match=rf"config\.{key}={value!r}".replace("(", r"\(").replace(")", r"\)")
  ):
    schema.validate(c)


def test_eval_splits_must_exist_in_the_dataset():
  c = _tiny()
  c.eval.splits = ("tset",)
  with pytest.raises(ValueError, match=r"eval\.splits.*tset"):
    schema.validate(c)
  c.data.synthetic.num_valid = 0  # a survey without valid participants has no valid split
  c.eval.splits = ("valid",)
  with pytest.raises(ValueError, match=r"eval\.splits.*'valid'.*\('train', 'test', 'zero_shot'\)"):
    schema.validate(c)
  c.data.dataset, c.data.builder_config = "wvb", "sampled_50k"
  c.eval.splits = ("zero_shot",)
  with pytest.raises(ValueError, match=r"eval\.splits.*\('train', 'valid', 'test'\)"):
    schema.validate(c)
  c.eval.splits = ()
  with pytest.raises(ValueError, match=r"eval\.splits.*empty"):
    schema.validate(c)


def test_cross_field_checks():
  c = _tiny()
  c.encoder.kind = "decoder"  # the tiny backbone encodes profiles, at width 32
  c.adapter.demographic_dim = 16
  with pytest.raises(ValueError, match=r"demographic_dim=16.*hidden_size=32"):
    schema.validate(c)
  c.encoder.kind = "fitted_ngrams"  # fitted at the width the routers read
  schema.validate(c)
  c = _tiny()
  c.eval.baselines = ("lora", "cuma")
  with pytest.raises(ValueError, match=r"eval\.baselines=\('lora', 'cuma'\) holds the run's own"):
    schema.validate(c)
  c = _tiny()
  c.adapter.top_k = c.adapter.num_experts + 1
  with pytest.raises(ValueError, match=r"adapter\.top_k"):
    schema.validate(c)
  c = _tiny()
  c.train.num_steps, c.train.num_epochs = -1, 0
  with pytest.raises(ValueError, match=r"num_steps"):
    schema.validate(c)
  c = _tiny()
  c.model.checkpoint = "/somewhere"  # its width is read from its config.json at load time
  c.adapter.demographic_dim = 16
  schema.validate(c)


@pytest.mark.parametrize(
  "kind, key, value",
  [
    ("fitted_ngrams", "checkpoint", "/encoder"),
    ("fitted_ngrams", "precomputed", "/z.npz"),
    ("fitted_ngrams", "pooling", "last_token"),
    ("fitted_ngrams", "max_length", 64),
    ("decoder", "ridge", 3.0),
  ],
)
def test_an_encoder_key_the_kind_does_not_read_is_refused(kind, key, value):
  c = _tiny()
  c.encoder.kind = kind
  c.encoder[key] = value
  with pytest.raises(ValueError, match=rf"config\.encoder\.{key}=.*read by encoder\.kind="):
    schema.validate(c)


def test_unknown_key_in_a_saved_config_is_named():
  saved = _tiny().to_dict()
  saved["optim"]["learning_rte"] = 1.0
  with pytest.raises(ValueError, match=r"config\.optim\.learning_rte is not a config key"):
    schema.from_dict(saved)


def test_config_keys_are_the_dataclass_fields():
  """The adapter section is AdapterConfig and data.synthetic is SyntheticSurveyConfig."""
  c = _tiny()
  adapter_keys = {f.name for f in dataclasses.fields(schema.AdapterConfig)} - {"param_dtype"}
  assert set(c.adapter.keys()) == adapter_keys
  assert set(c.data.synthetic.keys()) == {
    f.name for f in dataclasses.fields(schema.SyntheticSurveyConfig)
  }
  # A value set on the config reaches the dataclass (no hand-written copy to forget).
  c.adapter.gate_temperature = 0.25
  assert schema.adapter_config(schema.validate(c)).gate_temperature == 0.25


def test_resume_conflicts_classify_keys():
  saved = _tiny().to_dict()
  current = _tiny()
  assert schema.resume_conflicts(saved, current.to_dict()) == []
  current.model.checkpoint = ""  # free: where files live
  current.optim.learning_rate = 1e-4  # free
  current.train.log_every = 7  # free
  assert schema.resume_conflicts(saved, current.to_dict()) == []
  current.optim.grad_clip = 0.0
  current.adapter.rank = 3
  conflicts = schema.resume_conflicts(saved, current.to_dict())
  assert conflicts == [
    "adapter.rank: 8 -> 3 (identity)",
    "optim.grad_clip: 1.0 -> 0.0 (structural)",
  ]


def test_a_key_added_after_a_checkpoint_compares_as_its_default():
  saved = _tiny().to_dict()
  del saved["adapter"]["gate_temperature"]
  current = _tiny()
  assert schema.resume_conflicts(saved, current.to_dict()) == []
  current.adapter.gate_temperature = 2.0
  assert schema.resume_conflicts(saved, current.to_dict()) == [
    "adapter.gate_temperature: 1.0 -> 2.0 (identity)"
  ]


def test_ablations_belong_to_cuma():
  with pytest.raises(ValueError, match=r"ablation 'minimal' is an ablation of CuMA"):
    presets.experiment_config("lora", "tiny", "minimal")


def test_config_validation_names_the_key():
  c = ml_collections.ConfigDict(presets.experiment_config("cuma", "tiny").to_dict())
  for key, value, message in [
    ("adapter.top_k", 9, r"top_k"),
    ("optim.schedule", "step", r"optim\.schedule.*cosine"),
    ("data.dataset", "imagenet", r"data\.dataset.*synthetic"),
    ("encoder.pooling", "max", r"encoder\.pooling.*last_token"),
  ]:
    bad = ml_collections.ConfigDict(c.to_dict())
    parent, leaf = key.split(".")
    bad[parent][leaf] = value
    with pytest.raises(ValueError, match=message):
      schema.validate(bad)
  locked = presets.experiment_config("cuma", "tiny")
  with pytest.raises(AttributeError, match="learning_rte"):
    locked.optim.learning_rte = 1.0


@pytest.mark.parametrize("preset", presets.SCALES)
def test_a_typed_config_records_what_the_configdict_recorded(preset):
  """Checkpoints record the typed config (``fields.as_dict``); those written from the
  ConfigDict (its own JSON, before the runtime read the typed config) must compare equal, so
  that every workdir written before resumes."""
  c = presets.experiment_config("cuma", preset)
  typed = schema.validate(c)
  assert json.loads(json.dumps(schema.as_dict(typed))) == json.loads(c.to_json())
  assert schema.resume_conflicts(json.loads(c.to_json()), schema.as_dict(typed)) == []


def test_a_typed_config_is_validated_again_and_changed_by_overrides():
  config = schema.validate(_tiny())
  assert schema.validate(config) == config
  # Each section checks its own fields; a check across sections runs on validation only.
  full = dataclasses.replace(config, method="full")
  with pytest.raises(schema.errors.ConfigError, match="method='full' needs .*trainable='all'"):
    schema.validate(full)
  changed = presets.with_overrides(config, {"adapter.rank": 4, "eval.splits": ("valid",)})
  assert (changed.adapter.rank, changed.eval.splits) == (4, ("valid",))
  assert dataclasses.replace(changed, adapter=config.adapter, eval=config.eval) == config
  with pytest.raises(schema.errors.ConfigError, match=r"config\.adapter\.rank=0"):
    presets.with_overrides(config, {"adapter.rank": 0})
