"""Hugging Face import/export: a bit-exact round trip, and a bad tensor named on import."""

import copy
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

from cuma_jax.checkpoints import hf
from cuma_jax.checkpoints.safetensors_io import TensorIndex, write_safetensors
from cuma_jax.models.pretrained import load_pretrained, save_pretrained


@pytest.mark.parametrize("name", ["qwen3", "llama3", "qwen3_tied"])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_import_export_round_trip_is_bit_exact(
  tiny_checkpoint, pretrained, tmp_path, name, scan_layers
):
  _, torch_model = tiny_checkpoint(name)
  module, params = pretrained(name, scan_layers=scan_layers)
  save_pretrained(module, params, tmp_path)
  reloaded = type(torch_model).from_pretrained(tmp_path)
  original = torch_model.state_dict()
  again = reloaded.state_dict()
  assert set(original) == set(again)
  for key, value in original.items():
    assert torch.equal(value, again[key]), key


def test_bfloat16_round_trip_and_sharded_export(tiny_checkpoint, tmp_path):
  _, torch_model = tiny_checkpoint("llama3")
  bf16_dir = tmp_path / "bf16"
  # A copy: the fixture's model is shared with the parity tests and must stay float32.
  copy.deepcopy(torch_model).to(torch.bfloat16).save_pretrained(bf16_dir)
  module, params = load_pretrained(bf16_dir, dtype=jax.numpy.bfloat16)
  out = tmp_path / "out"
  # A small shard limit forces model.safetensors.index.json and several files.
  hf.export_params(
    params, module.config, out, output="logits", scan_layers=False, max_shard_bytes=20_000
  )
  assert (out / "model.safetensors.index.json").is_file()
  _, reread = load_pretrained(out, dtype=jax.numpy.bfloat16)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reread), strict=True):
    assert a.dtype == b.dtype and np.array_equal(
      np.asarray(a, np.float32), np.asarray(b, np.float32)
    )
  hf_again = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
  hf_orig = transformers.LlamaForCausalLM.from_pretrained(bf16_dir, dtype=torch.bfloat16)
  for key, value in hf_orig.state_dict().items():
    assert torch.equal(value, hf_again.state_dict()[key]), key


def _rewrite_tensors(path, edit):
  index = TensorIndex(path)
  tensors = {name: np.array(index.read(name)) for name in index.names()}
  edit(tensors)
  write_safetensors(str(path / "model.safetensors"), tensors.items())


@pytest.mark.parametrize(
  "edit, error, message",
  [
    (
      lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
      KeyError,
      r"missing.*model\.layers\.1\.mlp\.up_proj\.weight",
    ),
    (
      lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.zeros((2, 2), np.float32)}),
      KeyError,
      r"unexpected.*model\.layers\.0\.self_attn\.extra\.weight",
    ),
    (
      lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 32), np.float32)}),
      ValueError,
      r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(8, 32\)",
    ),
  ],
  ids=["missing", "unexpected", "shape"],
)
def test_bad_tensor_is_named(tiny_checkpoint, tmp_path, edit, error, message):
  path = shutil.copytree(tiny_checkpoint("qwen3")[0], tmp_path / "ckpt")
  _rewrite_tensors(path, edit)
  with pytest.raises(error, match=message):
    load_pretrained(path)
