"""Sharded jobs on 8 host devices: the rules presets, sharded loading, training, checkpoints
and evaluation on several meshes, each against one device."""

from flax import traverse_util
from helpers import divisible_qwen3, main_job_inputs, tiny_config, train_on_survey
import jax
import numpy as np
import pytest

from cuma_jax import runtime, schema, sharding
from cuma_jax.evaluation.survey import evaluate
from cuma_jax.models.config import ModelConfig
from cuma_jax.models.pretrained import load_pretrained, load_tokenizer
from cuma_jax.params import split_params
from cuma_jax.tasks import survey
from cuma_jax.training import checkpointing, loop

pytestmark = pytest.mark.slow

# A tiny Qwen3 whose heads (8), kv heads (4), MLP (48), hidden size (32) and padded
# vocabulary divide every mesh below.
HEADS, KV_HEADS, MLP = 8, 4, 48
TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")  # inputs on embed, heads and MLP
ONE_DEVICE = ("dp", (("data", 1),))
MESHES = [
  ("dp", (("data", 8),)),
  ("fsdp", (("fsdp", 8),)),
  ("fsdp_tp", (("fsdp", 2), ("model", 4))),
  ("fsdp_tp", (("data", 2), ("fsdp", 2), ("model", 2))),
  ("tp", (("data", 2), ("model", 4))),
]

# Where each parameter lives under fsdp_tp on (fsdp 2, model 4), worked out by hand from
# the preset: heads, kv heads, MLP, vocabulary and the adapters' inputs over "model";
# the hidden dimension over "fsdp"; layers (scanned), experts, ranks and norms whole.
FSDP_TP_SPECS = {
  "embed_tokens/embedding": ("model", "fsdp"),
  "lm_head/kernel": ("fsdp", "model"),
  "norm/scale": (None,),
  "layers/input_layernorm/scale": (None, None),
  "layers/post_attention_layernorm/scale": (None, None),
  "layers/self_attn/q_proj/kernel": (None, "fsdp", "model", None),
  "layers/self_attn/k_proj/kernel": (None, "fsdp", "model", None),
  "layers/self_attn/v_proj/kernel": (None, "fsdp", "model", None),
  "layers/self_attn/o_proj/kernel": (None, "model", None, "fsdp"),
  "layers/self_attn/q_norm/scale": (None, None),
  "layers/self_attn/k_norm/scale": (None, None),
  "layers/mlp/gate_proj/kernel": (None, "fsdp", "model"),
  "layers/mlp/up_proj/kernel": (None, "fsdp", "model"),
  "layers/mlp/down_proj/kernel": (None, "model", "fsdp"),
  # LoRA A along its input over "model"; B along its output as the projection's output.
  "layers/self_attn/adapters_in/q_proj_lora/a": (None, None, "model", None),
  "layers/self_attn/adapters_in/q_proj_lora/b": (None, None, None, "model"),
  "layers/self_attn/adapters_in/v_proj_lora/a": (None, None, "model", None),
  "layers/self_attn/adapters_in/v_proj_lora/b": (None, None, None, "model"),
  "layers/self_attn/adapters_out/o_proj_lora/a": (None, None, "model", None),
  "layers/self_attn/adapters_out/o_proj_lora/b": (None, None, None, "fsdp"),
  "layers/mlp/adapters_out/down_proj_lora/a": (None, None, "model", None),
  "layers/mlp/adapters_out/down_proj_lora/b": (None, None, None, "fsdp"),
  # Routers: the hidden state's weights along their input over "model", the rest whole.
  **{
    f"layers/{block}/{router}_router/{name}": spec
    for block, router in (
      ("self_attn/adapters_in", "q_proj"),
      ("self_attn/adapters_in", "v_proj"),
      ("self_attn/adapters_out", "o_proj"),
      ("mlp/adapters_out", "down_proj"),
    )
    for name, spec in (
      ("in_x", (None, "model", None)),
      ("in_z", (None, None, None)),
      ("in_bias", (None, None)),
      ("layer1_w", (None, None, None)),
      ("layer1_bias", (None, None)),
    )
  },
}
MESH_SIZES = {"fsdp": 2, "model": 4}


def _config(preset, shape, **overrides):
  return schema.validate(
    tiny_config(
      **{
        "adapter.targets": TARGETS,
        "mesh.rules_preset": preset,
        "mesh.shape": shape,
        "model.scan_layers": True,  # one layer body to compile; the 8B presets' form
        "train.num_steps": 1,
        "optim.warmup_steps": 0,
        # Every expert selected: at initialisation the routers' logits are nearly tied, so a
        # top-2 choice could flip with the rounding of a sharded sum (and with it which
        # experts are trained); the gates still weigh the experts, the balance loss still runs.
        "adapter.top_k": 4,
        **overrides,
      }
    )
  )


@pytest.fixture(scope="module")
def assets(main_job, tmp_path_factory):
  """The main job's tiny survey and a random tiny Qwen3 (with its tokenizer) that divides
  the meshes."""
  _, workdir = main_job
  data, warmed = main_job_inputs(workdir)
  directory = tmp_path_factory.mktemp("divisible_qwen3")
  return data, divisible_qwen3(directory, warmed, heads=HEADS, kv_heads=KV_HEADS, mlp=MLP)


def _load(config, backbone, layout=None):
  return load_pretrained(
    backbone,
    scan_layers=config.model.scan_layers,
    adapter=schema.adapter_config(config),
    rng=jax.random.PRNGKey(config.seed),
    layout=layout,
  )


def _flat(tree):
  return {"/".join(p): v for p, v in traverse_util.flatten_dict(tree).items()}


def test_sharded_load_places_each_shard_as_the_preset_says(assets):
  _, backbone = assets
  config = _config("fsdp_tp", (("fsdp", 2), ("model", 4)))
  layout = sharding.Layout.of(config.mesh)
  _, params = _load(config, backbone, layout)
  _, reference = _load(config, backbone)
  sharded, whole = _flat(params), _flat(reference)
  assert set(FSDP_TP_SPECS) == set(sharded)
  for path, spec in FSDP_TP_SPECS.items():
    array = sharded[path]
    assert tuple(array.sharding.spec) + (None,) * (array.ndim - len(array.sharding.spec)) == spec
    shard_shape = tuple(
      n // MESH_SIZES[a] if a else n for n, a in zip(array.shape, spec, strict=True)
    )
    # No device holds more than its own block of the tensor.
    assert {s.data.shape for s in array.addressable_shards} == {shard_shape}, path
  for path, array in sharded.items():
    np.testing.assert_array_equal(np.asarray(array), np.asarray(whole[path]), err_msg=path)


def _train_one_step(config, assets, workdir, edit=None):
  data, backbone = assets
  return train_on_survey(config, workdir, data, backbone, edit=edit)


@pytest.fixture(scope="module")
def one_device_steps(assets, tmp_path_factory):
  """The one-device reference step, scanned or not (built when first asked for)."""
  steps = {}

  def step(**overrides):
    key = tuple(sorted(overrides.items()))
    if key not in steps:
      config = _config(*ONE_DEVICE, **overrides)
      steps[key] = _train_one_step(config, assets, tmp_path_factory.mktemp("one"))
    return steps[key]

  return step


def _split_axes(shape) -> int:
  return sum(size > 1 for _, size in shape)


@pytest.mark.parametrize("preset,shape", MESHES, ids=lambda v: str(v))
def test_a_training_step_on_a_mesh_equals_one_device(
  assets, one_device_steps, preset, shape, tmp_path
):
  # Three split axes run unscanned: scanned, they are refused (see below).
  unscanned = {"model.scan_layers": False} if _split_axes(shape) >= 3 else {}
  one_device_step = one_device_steps(**unscanned)
  result = _train_one_step(_config(preset, shape, **unscanned), assets, tmp_path)
  assert result.trainable is not None
  np.testing.assert_allclose(result.losses, one_device_step.losses, rtol=0, atol=1e-5)
  expected = _flat(one_device_step.trainable)
  got = _flat(result.trainable)
  assert set(got) == set(expected)
  for path, value in got.items():
    np.testing.assert_allclose(
      np.asarray(value), np.asarray(expected[path]), atol=1e-5, err_msg=path
    )
  # The step changed the adapters (LoRA B starts at zero).
  assert any(np.abs(np.asarray(v)).max() > 0 for p, v in got.items() if p.endswith("lora/b"))


# The routers' last bias, per expert: a margin of ROUTER_GAP between the second and third
# expert's logits, far beyond what the hidden states add, so that top-2 is decided (no near
# tie a sharded sum's rounding could flip). Router i ranks the experts rolled by i.
ROUTER_GAP = 50.0


def _separated_routers(params, gap=ROUTER_GAP):
  """``params`` whose router i prefers experts i and i + 1 (mod 4) by ``gap``."""
  offsets = np.array([0.0, -1.0, -gap, -gap - 1.0], np.float32)
  flat = _flat(params)
  routers = sorted(p for p in flat if p.endswith("_router/layer1_bias"))
  for i, path in enumerate(routers):
    flat[path] = flat[path] + np.roll(offsets, i).astype(flat[path].dtype)
  return traverse_util.unflatten_dict({tuple(p.split("/")): v for p, v in flat.items()})


def test_a_top_2_training_step_on_a_mesh_equals_one_device(assets, tmp_path):
  """Sparse routing (top-2 of 4 experts) on a mesh: its routers' logits separated at init,
  the step equals one device's, and only the two experts each router picks are trained."""
  results = [
    _train_one_step(
      _config(preset, shape, **{"adapter.top_k": 2}),
      assets,
      tmp_path / preset,
      edit=_separated_routers,
    )
    for preset, shape in (ONE_DEVICE, MESHES[2])
  ]
  np.testing.assert_allclose(results[1].losses, results[0].losses, rtol=0, atol=1e-5)
  expected, got = _flat(results[0].trainable), _flat(results[1].trainable)
  for path, value in got.items():
    np.testing.assert_allclose(
      np.asarray(value), np.asarray(expected[path]), atol=1e-5, err_msg=path
    )
  # Routing decided: each projection's B moved for its router's two experts only.
  routers = sorted(p for p in got if p.endswith("_router/layer1_bias"))
  for i, router in enumerate(routers):
    b = np.asarray(got[router.replace("_router/layer1_bias", "_lora/b")])  # [layers, N, r, out]
    moved = np.abs(b).reshape(*b.shape[:2], -1).max(-1) > 0
    np.testing.assert_array_equal(
      moved, np.isin(np.arange(4), [i % 4, (i + 1) % 4])[None].repeat(len(b), 0), err_msg=router
    )


def test_checkpoint_saved_on_one_mesh_restores_onto_another(assets, tmp_path):
  saved = _config("fsdp", (("fsdp", 8),))
  result = _train_one_step(saved, assets, tmp_path)
  other = _config("tp", (("data", 2), ("model", 4)))
  layout = sharding.Layout.of(other.mesh)
  _, params = _load(other, assets[1], layout)
  trainable, _ = split_params(params, other.trainable)
  ckpt = checkpointing.TrainCheckpoints.of(
    other, str(tmp_path / "checkpoints"), config_conflicts=schema.resume_conflicts
  )
  step, state, _ = ckpt.restore_latest(loop.abstract_state(other, trainable))
  ckpt.close()
  assert step == 1
  restored, before = _flat(state["trainable"]), _flat(result.trainable)
  target = _flat(trainable)
  for path, value in restored.items():
    assert value.sharding == target[path].sharding, path
    np.testing.assert_array_equal(np.asarray(value), np.asarray(before[path]), err_msg=path)


def test_evaluation_on_a_mesh_equals_one_device(assets):
  data, backbone = assets
  results = []
  for preset, shape in (ONE_DEVICE, MESHES[3]):
    config = _config(preset, shape)
    module, params = _load(config, backbone, sharding.Layout.of(config.mesh))
    # Adapters that change the answers (B starts at zero).
    params = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.3 if getattr(p[-1], "key", "") == "b" else v, params
    )
    results.append(
      evaluate(
        config,
        module,
        params,
        load_tokenizer(backbone),
        data.sources["test"],
        runtime.make_demographics(config, backbone, survey.TASK, data.sources["train"]),
      )
    )
  assert results[0] == results[1]


def test_a_mesh_that_does_not_divide_is_refused_at_validation(assets):
  _, backbone = assets
  config = _config("tp", (("model", 8),), **{"model.checkpoint": backbone})
  # 4 kv heads over a model axis of 8.
  with pytest.raises(
    ValueError,
    match=r"layers/self_attn/k_proj/kernel dimension 2 \(kv_heads, size 4\) over mesh axes model \(size 8\)",
  ):
    runtime.check_layout(config, ModelConfig.from_pretrained(backbone))
  config = _config("fsdp_tp", (("data", 2), ("fsdp", 2), ("model", 2)))
  with pytest.raises(ValueError, match=r"scan_layers=True on a mesh split over 3 axes"):
    runtime.check_layout(config, ModelConfig.from_pretrained(backbone))
  config = _config("fsdp", (("fsdp", 8),), **{"data.batch_size": 4})
  with pytest.raises(
    ValueError, match=r"data.batch_size x processes = 4 over the batch axes \(8\)"
  ):
    runtime.check_layout(config, ModelConfig.from_pretrained(backbone))


def test_rules_only_with_the_custom_preset():
  config = tiny_config(**{"mesh.rules": (("batch", "data"),)})
  with pytest.raises(ValueError, match="rules_preset='custom' only"):
    schema.validate(config)
  with pytest.raises(ValueError, match="axes must be distinct names among"):
    schema.validate(tiny_config(**{"mesh.shape": (("tensor", 2),)}))
