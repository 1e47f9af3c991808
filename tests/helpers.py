"""Helpers shared by several test files: one copy of each.

Expensive artefacts (tiny checkpoints, loaded models, data sets, the main job's run) are
session fixtures in ``conftest.py``; this module holds the plain functions and constants.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
import transformers

from cuma_jax import presets, runtime, schema
from cuma_jax.checkpoints.safetensors_io import SINGLE_FILE, TensorIndex, write_safetensors
from cuma_jax.layers.adapter_config import AdapterConfig
from cuma_jax.tasks import survey

# The adapted decoder's tests: a CuMA mixture on six of the seven projections, read by the
# tests of the decoder, of the parameter split and of the demographics check.
D_DEMO = 6
CUMA = AdapterConfig(
  targets=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
  rank=4,
  alpha=8.0,
  num_experts=4,
  top_k=2,
  router_hidden=(16,),
  demographic_dim=D_DEMO,
  strategy="dense",
)


def randomise(tree, seed, *, scale=1.0, names=None):
  """``tree`` with normal(0, scale) values (numpy ``seed``) in the leaves named ``names``.

  ``names`` None randomises every leaf.  LoRA's B starts at zero: randomising it makes an
  adapter change its output, so that a check of the adapted path means something.
  """
  rng = np.random.default_rng(seed)

  def leaf(path, value):
    if names is not None and getattr(path[-1], "key", None) not in names:
      return value
    return jnp.asarray(scale * rng.normal(size=value.shape), value.dtype)

  return jax.tree_util.tree_map_with_path(leaf, tree)


def padded_batch(vocab, lengths, length, seed=0):
  """Random token ids [len(lengths), length] and their right-padded attention mask."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, size=(len(lengths), length))
  mask = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
  return ids, mask


def adapter_inputs(vocab, seed=0):
  """Ids, mask and demographics [2, D_DEMO] for the adapted decoder (row 1 padded after 6)."""
  ids, mask = padded_batch(vocab, [9, 6], 9, seed)
  z = np.random.default_rng(seed + 1000).normal(size=(2, D_DEMO)).astype(np.float32)
  return jnp.asarray(ids), jnp.asarray(mask, jnp.int32), jnp.asarray(z)


def word_level_tokenizer(vocab, unk_token, *, pad_token=None, pre_tokenizer=None, normalizer=None):
  """A ``PreTrainedTokenizerFast`` over a fixed word vocabulary (whitespace split by default)."""
  tok = Tokenizer(models.WordLevel(vocab, unk_token=unk_token))
  tok.pre_tokenizer = pre_tokenizers.Whitespace() if pre_tokenizer is None else pre_tokenizer
  if normalizer is not None:
    tok.normalizer = normalizer
  kwargs = {} if pad_token is None else {"pad_token": pad_token}
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk_token, **kwargs)


def tiny_config(**overrides):
  """The `tiny` CuMA experiment config (unlocked), with short checkpoint and log intervals.

  ``overrides`` maps dotted keys to values, e.g. ``tiny_config(**{"train.num_steps": 6})``.
  """
  c = ml_collections.ConfigDict(presets.experiment_config("cuma", "tiny").to_dict())
  c.train.update(log_every=1, checkpoint_every=3, keep_checkpoints=5)
  c.optim.update(schedule="cosine", warmup_steps=2)
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def main_job_inputs(workdir):
  """(the tiny survey, the warmed-up tiny backbone) of the session's main-job run in
  ``workdir``, as `cuma_jax.run` leaves them (built here if that run failed before)."""
  config = schema.validate(tiny_config())
  data = survey.load_data(config, str(workdir))
  backbone = runtime.build_tiny_backbone(
    config, os.path.join(workdir, "assets"), data, survey.TASK, log=lambda *_: None
  )
  return data, backbone


def edit_lines(path, edit):
  """Rewrites a text file through ``edit(lines)`` (lines without their newlines)."""
  lines = path.read_text().split("\n")
  edit(lines)
  path.write_text("\n".join(lines))


def other_backbone(backbone, directory):
  """A copy of checkpoint ``backbone`` with one weight changed: same shapes, other contents."""
  shutil.copytree(backbone, directory)
  index = TensorIndex(directory)
  tensors = {name: np.array(index.read(name)) for name in index.names()}
  tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1.0
  write_safetensors(os.path.join(directory, SINGLE_FILE), tensors.items())
  return str(directory)


def divisible_qwen3(directory, tokenizer_dir, *, heads, kv_heads, hidden=32, mlp=48):
  """A random tiny Qwen3 checkpoint with the tokenizer of ``tokenizer_dir`` and a vocabulary
  padded to a multiple of 8, whose dimensions divide meshes of up to 8 devices."""
  import torch

  from cuma_jax.models.config import ModelConfig

  vocab = -(-ModelConfig.from_pretrained(tokenizer_dir).vocab_size // 8) * 8
  hf_config = transformers.Qwen3Config(
    vocab_size=vocab,
    hidden_size=hidden,
    intermediate_size=mlp,
    num_hidden_layers=2,
    num_attention_heads=heads,
    num_key_value_heads=kv_heads,
    head_dim=8,
    max_position_embeddings=256,
    tie_word_embeddings=False,
  )
  torch.manual_seed(0)
  transformers.Qwen3ForCausalLM(hf_config).save_pretrained(directory)
  for name in os.listdir(tokenizer_dir):
    if name.startswith(("tokenizer", "chat_template", "special_tokens")):
      shutil.copy(os.path.join(tokenizer_dir, name), directory)
  return str(directory)


def train_on_survey(
  config, workdir, data, backbone, *, wrap=None, inputs=None, log=None, edit=None
):
  """``loop.train`` of ``config`` on the survey's training split from ``backbone``, as the
  job trains (resuming a workdir's checkpoints the way it does); ``wrap`` wraps the dataset,
  ``edit`` maps the loaded parameters to those training starts from."""
  from cuma_jax.data.pipeline import make_dataset
  from cuma_jax.models.pretrained import load_pretrained, load_tokenizer
  from cuma_jax.training import loop

  module, params = load_pretrained(
    backbone,
    scan_layers=config.model.scan_layers,
    adapter=schema.adapter_config(config),
    rng=jax.random.PRNGKey(config.seed),
  )
  params = jax.tree.map(np.asarray, edit(params) if edit else params)  # A host copy: the
  # step donates its inputs.
  dataset, tables = make_dataset(
    data.sources["train"],
    load_tokenizer(backbone),
    max_length=config.data.max_length,
    batch_size=config.data.batch_size,
    seed=config.data.shuffle_seed,
    num_epochs=None,
    demographic_system_prompt=config.data.demographic_system_prompt,
  )
  demographics = runtime.make_demographics(config, backbone, survey.TASK, data.sources["train"])
  return loop.train(
    config,
    str(workdir),
    module,
    params,
    wrap(dataset) if wrap else dataset,
    num_steps=config.train.num_steps,
    demographic_table=survey.demographic_table(demographics, tables),
    inputs=inputs,
    config_conflicts=schema.resume_conflicts,
    log=log or (lambda *_: None),
  )
