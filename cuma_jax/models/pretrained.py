"""Build a decoder from a local Hugging Face checkpoint directory, and export it back."""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cuma_jax import registry
from cuma_jax.checkpoints import hf
from cuma_jax.layers.adapter_config import AdapterConfig
from cuma_jax.models.config import ModelConfig
from cuma_jax.models.decoder import Decoder
from cuma_jax.params import filter_tree, is_adapter_path, merge_trees
from cuma_jax.sharding import Layout


def build_decoder(
  config: ModelConfig,
  *,
  dtype=jnp.float32,
  param_dtype=None,
  scan_layers: bool = False,
  remat: str = "none",
  output: str = "logits",
  adapter: AdapterConfig | None = None,
) -> Decoder:
  return Decoder(
    config=config,
    dtype=dtype,
    param_dtype=param_dtype or dtype,
    scan_layers=scan_layers,
    remat=remat,
    output=output,
    adapter=adapter,
  )


def dummy_inputs(module: Decoder, batch: int = 1, length: int = 2) -> dict[str, Any]:
  """Arguments that trace ``module`` (for init and ``eval_shape``)."""
  inputs = {"input_ids": jnp.zeros((batch, length), jnp.int32)}
  if module.adapter is not None and module.adapter.uses_demographics:
    inputs["demographics"] = jnp.zeros((batch, module.adapter.demographic_dim), jnp.float32)
  return inputs


def abstract_params(module: Decoder):
  """Boxed (logically partitioned) parameter shapes, without allocating anything."""
  # A fresh copy of the cached tree: callers may edit theirs.
  return jax.tree.map(lambda x: x, _abstract_params(module, registry.generation()))


# Traced once per module (modules are frozen and hashable; the registries' generation
# stands for the variants they name): every load, layout check, plan and training run of
# the same model in a process reuses the trace.
@functools.lru_cache(maxsize=64)
def _abstract_params(module: Decoder, generation: int):
  del generation  # a key only
  return jax.eval_shape(lambda: module.init(jax.random.key(0), **dummy_inputs(module)))["params"]


def init_adapter_params(module: Decoder, rng, shardings=None) -> dict:
  """Initialises only the adapter parameters (XLA drops the unused backbone init), each
  directly in its place when ``shardings`` (the whole model's tree) is given."""
  out = None if shardings is None else filter_tree(shardings, is_adapter_path)
  leaves, treedef = jax.tree.flatten(out)
  return _adapter_initialiser(module, tuple(leaves), treedef, registry.generation())(rng)


@functools.lru_cache(maxsize=64)
def _adapter_initialiser(module: Decoder, sharding_leaves, sharding_treedef, generation: int):
  """The jitted adapter initialisation of ``module``, traced and compiled once per process."""
  del generation  # a key only

  def init(key):
    params = nn.unbox(module.init(key, **dummy_inputs(module))["params"])
    return filter_tree(params, is_adapter_path)

  out = jax.tree.unflatten(sharding_treedef, sharding_leaves)
  return jax.jit(init, out_shardings=out)


def load_pretrained(
  path: str | os.PathLike,
  dtype=jnp.float32,
  *,
  param_dtype=None,
  scan_layers: bool = False,
  remat: str = "none",
  output: str = "logits",
  adapter: AdapterConfig | None = None,
  rng=None,
  layout: Layout | None = None,
):
  """Loads a local Hugging Face Qwen3 / Llama checkpoint.

  Returns ``(module, params)``: ``module.apply({"params": params}, input_ids,
  attention_mask=mask)`` gives float32 logits [batch, length, vocab] (with ``adapter``:
  ``(logits, aux)``, and ``demographics=`` when its routers read them).  ``dtype`` is the
  compute dtype, ``param_dtype`` (default: ``dtype``) the dtype the weights are cast to.
  With ``adapter``, freshly initialised adapter parameters (from ``rng``) are merged in.
  With ``layout``, every parameter is placed onto its mesh as its rules say, tensor by
  tensor, without any device or the host holding the whole model.
  """
  config = ModelConfig.from_pretrained(path)
  module = build_decoder(
    config,
    dtype=dtype,
    param_dtype=param_dtype,
    scan_layers=scan_layers,
    remat=remat,
    output=output,
    adapter=adapter,
  )
  backbone_module = module.clone(adapter=None)
  shapes = nn.unbox(abstract_params(backbone_module))
  shardings = None if layout is None else layout.param_shardings(abstract_params(module))
  params = hf.import_params(
    path,
    config,
    shapes,
    output=output,
    scan_layers=scan_layers,
    dtype=module.param_dtype,
    shardings=shardings,
  )
  params = jax.tree.map(jnp.asarray, params)
  if adapter is not None:
    rng = jax.random.key(0) if rng is None else rng
    params = merge_trees(params, init_adapter_params(module, rng, shardings))
  return module, params


def save_pretrained(module: Decoder, params, path: str | os.PathLike, dtype=None) -> None:
  """Writes the backbone back as a Hugging Face checkpoint (adapters are not merged)."""
  backbone = filter_tree(params, lambda p: not is_adapter_path(p))
  hf.export_params(
    backbone, module.config, path, output=module.output, scan_layers=module.scan_layers, dtype=dtype
  )


def load_tokenizer(path: str | os.PathLike):
  """The checkpoint directory's tokenizer (chat template included), never remote code."""
  import transformers

  return transformers.AutoTokenizer.from_pretrained(os.fspath(path), trust_remote_code=False)
