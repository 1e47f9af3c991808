"""Import/export round trip and the errors a bad checkpoint must raise."""

import copy
import json
import os
import shutil
import struct

import jax
import numpy as np
import pytest
import torch
import transformers

from cuma_jax.checkpoints.safetensors_io import write_safetensors
from cuma_jax.models.pretrained import load_pretrained, load_tokenizer, save_pretrained


@pytest.mark.parametrize("name", ["qwen3", "llama3", "qwen3_tied"])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_import_export_round_trip_is_bit_exact(tiny_checkpoint, tmp_path, name, scan_layers):
  directory, torch_model = tiny_checkpoint(name)
  module, params = load_pretrained(directory, scan_layers=scan_layers)
  save_pretrained(module, params, tmp_path)
  reloaded = type(torch_model).from_pretrained(tmp_path)
  original = torch_model.state_dict()
  again = reloaded.state_dict()
  assert set(original) == set(again)
  for key, value in original.items():
    assert torch.equal(value, again[key]), key


def test_bfloat16_round_trip_and_sharded_export(tiny_checkpoint, tmp_path):
  directory, torch_model = tiny_checkpoint("llama3")
  bf16_dir = tmp_path / "bf16"
  # A copy: the fixture's model is shared with the parity tests and must stay float32.
  copy.deepcopy(torch_model).to(torch.bfloat16).save_pretrained(bf16_dir)
  module, params = load_pretrained(bf16_dir, dtype=jax.numpy.bfloat16)
  out = tmp_path / "out"
  # A small shard limit forces model.safetensors.index.json and several files.
  from cuma_jax.checkpoints import hf

  hf.export_params(
    params, module.config, out, output="logits", scan_layers=False, max_shard_bytes=20_000
  )
  assert os.path.isfile(out / "model.safetensors.index.json")
  _, reread = load_pretrained(out, dtype=jax.numpy.bfloat16)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reread)):
    assert a.dtype == b.dtype and np.array_equal(
      np.asarray(a, np.float32), np.asarray(b, np.float32)
    )
  hf_again = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
  hf_orig = transformers.LlamaForCausalLM.from_pretrained(bf16_dir, dtype=torch.bfloat16)
  for key, value in hf_orig.state_dict().items():
    assert torch.equal(value, hf_again.state_dict()[key]), key


def _copy(directory, tmp_path):
  target = tmp_path / "ckpt"
  shutil.copytree(directory, target)
  return target


def _rewrite_tensors(path, edit):
  from cuma_jax.checkpoints.safetensors_io import TensorIndex

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
  path = _copy(tiny_checkpoint("qwen3")[0], tmp_path)
  _rewrite_tensors(path, edit)
  with pytest.raises(error, match=message):
    load_pretrained(path)


def test_directory_without_checkpoint_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no config\.json"):
    load_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
  with pytest.raises(FileNotFoundError, match=r"not a safetensors checkpoint"):
    load_pretrained(tmp_path)


@pytest.mark.parametrize(
  "damage",
  [
    lambda path: os.truncate(path, os.path.getsize(path) - 100),
    lambda path: os.truncate(path, 5),
    lambda path: _overwrite(path, 0, struct.pack("<Q", 1 << 62)),
    lambda path: _overwrite(path, 8, b"[1, 2]"),
  ],
  ids=["truncated_data", "truncated_prefix", "absurd_header_length", "header_not_an_index"],
)
def test_corrupt_safetensors_file_is_named(tiny_checkpoint, tmp_path, damage):
  path = _copy(tiny_checkpoint("qwen3")[0], tmp_path)
  damage(path / "model.safetensors")
  with pytest.raises(ValueError, match=rf"{path}/model\.safetensors is corrupt"):
    load_pretrained(path)


def _overwrite(path, offset, data):
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(data)


def test_missing_shard_is_named(tiny_checkpoint, tmp_path):
  path = _copy(tiny_checkpoint("qwen3")[0], tmp_path)
  (path / "model.safetensors.index.json").write_text(
    json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})
  )
  with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors"):
    load_pretrained(path)


def test_unsupported_model_type_lists_supported(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(ValueError, match=r"gpt2.*llama, qwen3"):
    load_pretrained(tmp_path)


def test_tokenizer_loads_from_the_checkpoint_directory(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {"<unk>": 0, "hello": 1, "world": 2}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
  fast.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
  fast.save_pretrained(tmp_path)
  loaded = load_tokenizer(tmp_path)
  assert loaded.encode("hello world", add_special_tokens=False) == [1, 2]
  assert (
    loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user]hi"
  )
