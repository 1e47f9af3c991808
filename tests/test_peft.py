"""PEFT LoRA interop: our LoRA exported loads in ``peft`` with equal logits, and back."""

import functools
import json
import os

from helpers import padded_batch
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from cuma_jax import fields
from cuma_jax.checkpoints import adapter_formats, adapter_import
from cuma_jax.checkpoints import peft as peft_format
from cuma_jax.layers.adapter_config import TARGET_MODULES, AdapterConfig
from cuma_jax.params import filter_tree, is_adapter_path, merge_trees, split_params

LORA = AdapterConfig(
  targets=TARGET_MODULES,
  rank=4,
  alpha=8.0,
  router="none",
  num_experts=1,
  top_k=1,
  a_init="kaiming_uniform",
  demographic_dim=0,
)
LENGTHS = [9, 6]
RNG = jax.random.PRNGKey(1)  # one key: the tests reuse each loaded model


def _batch(module):
  ids, mask = padded_batch(module.config.vocab_size, LENGTHS, 9, seed=3)
  return ids, mask


def _logits(module, params, ids, mask):
  return np.asarray(jax.jit(functools.partial(_logits_jax, module))(params, ids, mask))


def _train_three_steps(module, params, ids, mask):
  """Three SGD steps of next-token loss on the adapters (the backbone frozen)."""
  trainable, frozen = split_params(params)

  def loss(t):
    logits = _logits_jax(module, merge_trees(frozen, t), ids, mask)
    logp = jax.nn.log_softmax(logits[:, :-1])
    picked = jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], -1)[..., 0]
    return -jnp.sum(picked * mask[:, 1:]) / jnp.sum(mask[:, 1:])

  step = jax.jit(lambda t: jax.tree.map(lambda p, g: p - 0.5 * g, t, jax.grad(loss)(t)))
  for _ in range(3):
    trainable = step(trainable)
  return merge_trees(frozen, trainable)


def _logits_jax(module, params, ids, mask):
  return module.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))[0]


def _torch_logits(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _max_diff(a, b, mask):
  return float(np.max(np.abs(a - b)[np.asarray(mask, bool)]))


def _export(params, adapter, directory, base):
  flat = adapter_formats.unstack(filter_tree(params, is_adapter_path))
  peft_format.export(flat, adapter, adapter_formats.num_layers(flat), directory, base_model=base)


@pytest.mark.parametrize("name", ["qwen3", pytest.param("llama3", marks=pytest.mark.slow)])
def test_trained_lora_loads_in_peft_with_equal_logits(tiny_checkpoint, pretrained, tmp_path, name):
  directory, torch_model = tiny_checkpoint(name)
  module, params = pretrained(name, adapter=LORA, rng=RNG)
  ids, mask = _batch(module)
  params = _train_three_steps(module, params, ids, mask)
  _export(params, LORA, tmp_path / "peft", directory)
  loaded = peft.PeftModel.from_pretrained(
    type(torch_model).from_pretrained(directory), tmp_path / "peft"
  )
  ours, theirs = _logits(module, params, ids, mask), _torch_logits(loaded.eval(), ids, mask)
  base = _torch_logits(torch_model, ids, mask)
  assert _max_diff(theirs, base, mask) > 1e-2  # the trained adapter changes the output
  assert _max_diff(ours, theirs, mask) < 1e-4


def _perturbed_peft(directory, torch_model, out, **lora_kwargs):
  """A PEFT LoRA adapter made in torch, with every A and B randomised."""
  base = type(torch_model).from_pretrained(directory)
  config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGET_MODULES), **lora_kwargs)
  model = peft.get_peft_model(base, config)
  torch.manual_seed(5)
  with torch.no_grad():
    for param_name, param in model.named_parameters():
      if "lora_" in param_name:
        param.normal_(0, 0.1)
  model.save_pretrained(out)
  return model.eval()


@pytest.mark.parametrize(
  "name, scan_layers", [("qwen3", False), pytest.param("llama3", True, marks=pytest.mark.slow)]
)
def test_peft_adapter_made_in_torch_imports_with_equal_logits(
  tiny_checkpoint, pretrained, tmp_path, name, scan_layers
):
  directory, torch_model = tiny_checkpoint(name)
  theirs_model = _perturbed_peft(directory, torch_model, tmp_path / "peft")
  adapter = AdapterConfig(**{**_fields(LORA), "init_from": str(tmp_path / "peft")})
  module, params = pretrained(name, adapter=LORA, scan_layers=scan_layers, rng=RNG)
  params = adapter_import.initialise(params, adapter, scan_layers)
  ids, mask = _batch(module)
  diff = _max_diff(_logits(module, params, ids, mask), _torch_logits(theirs_model, ids, mask), mask)
  assert diff < 1e-4
  # And back: exporting what was imported gives the same tensors, bit for bit.
  _export(params, LORA, tmp_path / "again", directory)
  for file in (tmp_path / "peft", tmp_path / "again"):
    assert os.path.isfile(file / peft_format.WEIGHTS)
  original = _tensors(tmp_path / "peft")
  again = _tensors(tmp_path / "again")
  assert original.keys() == again.keys()
  for key, value in original.items():
    assert np.array_equal(value, again[key]), key


def _tensors(directory):
  from cuma_jax.checkpoints.safetensors_io import TensorIndex

  index = TensorIndex(directory, filename=peft_format.WEIGHTS)
  return {n: np.array(index.read(n)) for n in index.names()}


def _fields(adapter):
  return {f.name: getattr(adapter, f.name) for f in fields.config_fields(AdapterConfig)}


@pytest.fixture(scope="module")
def peft_dir(tiny_checkpoint, tmp_path_factory):
  directory, torch_model = tiny_checkpoint("qwen3")
  out = tmp_path_factory.mktemp("peft")
  _perturbed_peft(directory, torch_model, out)
  return out


def _edited_copy(peft_dir, tmp_path, config_edit=None, tensor_edit=None):
  import shutil

  out = shutil.copytree(peft_dir, tmp_path / "edited")
  if config_edit:
    path = out / "adapter_config.json"
    config = json.loads(path.read_text())
    config_edit(config)
    path.write_text(json.dumps(config))
  if tensor_edit:
    from cuma_jax.checkpoints.safetensors_io import write_safetensors

    tensors = _tensors(out)
    tensor_edit(tensors)
    write_safetensors(str(out / peft_format.WEIGHTS), tensors.items())
  return str(out)


@pytest.mark.parametrize(
  "edit, named",
  [
    (lambda c: c.update(use_dora=True), "use_dora"),
    (lambda c: c.update(use_rslora=True), "use_rslora"),
    (lambda c: c.update(bias="lora_only"), "bias"),
    (lambda c: c.update(modules_to_save=["lm_head"]), "modules_to_save"),
    (lambda c: c.update(rank_pattern={"q_proj": 8}), "rank_pattern"),
    (lambda c: c.update(alpha_pattern={"q_proj": 32}), "alpha_pattern"),
    (lambda c: c.update(target_modules="all-linear"), "target_modules"),
    (lambda c: c.update(layers_to_transform=[0]), "layers_to_transform"),
  ],
)
def test_unsupported_peft_features_are_refused_by_name(peft_dir, tmp_path, edit, named):
  directory = _edited_copy(peft_dir, tmp_path, config_edit=edit)
  adapter = AdapterConfig(**{**_fields(LORA), "init_from": directory})
  with pytest.raises(adapter_formats.FormatError, match=named):
    adapter_import.check_config(adapter)


def test_a_config_that_differs_from_the_directory_names_the_keys(peft_dir):
  adapter = AdapterConfig(**{**_fields(LORA), "rank": 8, "init_from": str(peft_dir)})
  with pytest.raises(
    adapter_formats.FormatError, match=r"adapter\.rank=8.*--config\.adapter\.rank=4"
  ):
    adapter_import.check_config(adapter)


@pytest.mark.parametrize(
  "edit, named",
  [
    (
      lambda t: t.pop("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"),
      r"missing.*layers\.1\.mlp\.up_proj\.lora_B",
    ),
    (
      lambda t: t.update({"base_model.model.lm_head.lora_A.weight": np.zeros((4, 32), np.float32)}),
      r"extra.*lm_head\.lora_A",
    ),
    (
      lambda t: t.update(
        {
          "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros(
            (4, 8), np.float32
          )
        }
      ),
      r"q_proj\.lora_A\.weight.*shape \(4, 8\), expected \(4, 32\)",
    ),
  ],
  ids=["missing", "extra", "shape"],
)
def test_a_bad_tensor_is_named(pretrained, peft_dir, tmp_path, edit, named):
  directory = _edited_copy(peft_dir, tmp_path, tensor_edit=edit)
  adapter = AdapterConfig(**{**_fields(LORA), "init_from": directory})
  _, params = pretrained("qwen3", adapter=LORA, rng=RNG)
  with pytest.raises(adapter_formats.FormatError, match=named):
    adapter_import.initialise(params, adapter, False)


def test_only_plain_lora_exports_as_peft():
  for key, value in (("router", "token"), ("prefix_length", 4)):
    fields = {**_fields(LORA), key: value}
    if key == "router":
      fields.update(num_experts=2, top_k=1)
    with pytest.raises(adapter_formats.FormatError, match=f"adapter.{key}"):
      peft_format.check_exportable(AdapterConfig(**fields))
