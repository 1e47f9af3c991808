"""Functional linen decoder covering Qwen3 and Llama 3.x as Hugging Face defines them.

One implementation, parameterised by :class:`ModelConfig`: RMSNorm, rotary embeddings
(with Llama 3 ``rope_scaling``), grouped-query attention, Qwen3's q/k RMSNorm, SwiGLU,
tied or untied embeddings, optional biases.  Norms and the attention softmax run in
float32 whatever the compute dtype.  Layers can be scanned (``nn.scan``) and/or
rematerialised with identical numbers.  Adapters (LoRA experts, routers, prefixes) plug
into the projections through :mod:`cuma_jax.layers.group`; with ``adapter=None`` the
module is exactly the frozen backbone.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cuma_jax import sharding as ax
from cuma_jax.layers.adapter_config import AdapterConfig, check_demographics
from cuma_jax.layers.demographic import DemographicProjection
from cuma_jax.layers.group import AdapterGroup, finalize_aux, merge_aux, with_prefix
from cuma_jax.models.config import ModelConfig, RopeConfig

Dtype = Any
OUTPUTS = ("logits", "hidden_states")
REMAT_POLICIES = ("none", "full", "dots")


def _partitioned(init, axes):
  return nn.with_logical_partitioning(init, axes)


class RMSNorm(nn.Module):
  """Hugging Face's RMSNorm: normalise in float32, cast back, then scale."""

  eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param(
      "scale", _partitioned(nn.initializers.ones, (ax.NORM,)), (x.shape[-1],), self.param_dtype
    )
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return jnp.asarray(scale, self.dtype) * normed.astype(self.dtype)


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
  """Inverse frequencies (float32), including Llama 3's piecewise frequency scaling."""
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv_freq = (1.0 / (np.float32(rope.theta) ** exponents)).astype(np.float32)
  if rope.rope_type == "linear":
    return inv_freq / np.float32(rope.factor)
  if rope.rope_type == "llama3":
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
      rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  return inv_freq


def apply_rope(x, positions, inv_freq):
  """Rotates ``x`` [B, T, heads, head_dim] by ``positions`` [B, T] (HF's half-split layout)."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def build_attention_mask(attention_mask, query_len, prefix_len=0, query_offset=0):
  """[B, T, P + S] boolean mask: causal, padding masked on keys, learned prefixes visible.

  ``attention_mask`` [B, S] covers the keys; query t sits at key position
  ``query_offset + t`` (0 for a whole sequence, the cache index when decoding).
  """
  key_len = attention_mask.shape[1]
  query_positions = query_offset + jnp.arange(query_len)
  causal = jnp.arange(key_len)[None, :] <= query_positions[:, None]
  mask = causal[None] & attention_mask[:, None, :].astype(bool)
  if prefix_len:
    prefix = jnp.ones((mask.shape[0], query_len, prefix_len), bool)
    mask = jnp.concatenate([prefix, mask], axis=-1)
  return mask


def dot_product_attention(q, k, v, mask, dtype):
  """Grouped-query attention; q [B,T,H,D], k/v [B,S,KV,D], mask [B,T,S]. Softmax in fp32.

  Keys and values are plain arguments so a key/value cache (or learned prefixes) can be
  concatenated by the caller without touching this function.
  """
  batch, length, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores * (head_dim**-0.5)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(batch, length, heads, head_dim)


class Projection(nn.Module):
  """A linear map over the trailing ``len(in_axes)`` dimensions, with named axes.

  The kernel is created at its full named shape (not flattened and reshaped, as
  ``nn.DenseGeneral`` does), so its logical sharding applies even inside a mesh context.
  """

  features: tuple[int, ...]
  in_axes: tuple[str, ...]
  out_axes: tuple[str, ...]
  use_bias: bool
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x):
    n_in = len(self.in_axes)
    kernel = self.param(
      "kernel",
      _partitioned(nn.initializers.normal(0.02), self.in_axes + self.out_axes),
      x.shape[-n_in:] + tuple(self.features),
      self.param_dtype,
    )
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(
      x.astype(self.dtype), jnp.asarray(kernel, self.dtype), (contract, ((), ()))
    )
    if self.use_bias:
      bias = self.param(
        "bias",
        _partitioned(nn.initializers.zeros, self.out_axes),
        tuple(self.features),
        self.param_dtype,
      )
      y = y + jnp.asarray(bias, self.dtype)
    return y


class _Block(nn.Module):
  """Fields shared by the attention, MLP and decoder-layer modules."""

  config: ModelConfig
  adapter: AdapterConfig | None
  dtype: Dtype
  param_dtype: Dtype
  deterministic: bool
  capture_routing: bool

  def norm(self, name):
    return RMSNorm(self.config.rms_norm_eps, self.dtype, self.param_dtype, name=name)


def _adapted_projections(
  block: _Block, router_group: str, x, demographics, token_mask, in_axes, projections, use_bias
):
  """Frozen projections of ``x`` plus their adapters' deltas (one router group).

  ``projections``: {name: (features, out_axes)}.  Adapters see ``x`` with its feature
  dimensions flattened (on the logical axis ``ADAPTER_IN``, so the rules can split adapters
  apart from the backbone) and return flat deltas that are reshaped onto each projection's
  output.
  """
  flat = x.reshape(*x.shape[:2], -1)
  deltas, aux = AdapterGroup(
    adapter=block.adapter,
    group=router_group,
    dtype=block.dtype,
    deterministic=block.deterministic,
    capture_routing=block.capture_routing,
    name=f"adapters_{router_group.split('_')[1]}",
  )(
    flat,
    demographics,
    token_mask,
    {n: (int(np.prod(f)), axes[0]) for n, (f, axes) in projections.items()},
    in_axis=ax.ADAPTER_IN,
  )
  outputs = {}
  for name, (features, out_axes) in projections.items():
    y = Projection(
      features=features,
      in_axes=in_axes,
      out_axes=out_axes,
      use_bias=use_bias,
      dtype=block.dtype,
      param_dtype=block.param_dtype,
      name=name,
    )(x)
    if name in deltas:
      y = y + deltas[name].reshape(y.shape).astype(y.dtype)
    outputs[name] = y
  return outputs, aux


class Attention(_Block):
  @nn.compact
  def __call__(self, x, mask, positions, demographics, token_mask, cache=None, cache_index=None):
    """With ``cache`` ({"key", "value"}: [B, S, kv_heads, head_dim]), this call's keys and
    values are written at ``cache_index`` and the queries attend over the whole cache;
    returns (out, aux, updated cache) instead of (out, aux)."""
    cfg = self.config
    head = (ax.HEAD_DIM,)
    qkv, aux_in = _adapted_projections(
      self,
      "attn_in",
      x,
      demographics,
      token_mask,
      (ax.EMBED,),
      {
        "q_proj": ((cfg.num_heads, cfg.head_dim), (ax.HEADS,) + head),
        "k_proj": ((cfg.num_kv_heads, cfg.head_dim), (ax.KV_HEADS,) + head),
        "v_proj": ((cfg.num_kv_heads, cfg.head_dim), (ax.KV_HEADS,) + head),
      },
      cfg.attention_bias,
    )
    q, k, v = qkv["q_proj"], qkv["k_proj"], qkv["v_proj"]
    if cfg.qk_norm:
      q, k = self.norm("q_norm")(q), self.norm("k_norm")(k)
    inv_freq = rope_inverse_frequencies(cfg.rope, cfg.head_dim)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    if cache is not None:
      start = (0, cache_index, 0, 0)
      cache = {
        "key": jax.lax.dynamic_update_slice(cache["key"], k.astype(cache["key"].dtype), start),
        "value": jax.lax.dynamic_update_slice(
          cache["value"], v.astype(cache["value"].dtype), start
        ),
      }
      k, v = cache["key"], cache["value"]
    k, v = with_prefix(self, self.adapter, k, v, self.dtype)
    out = dot_product_attention(q, k, v, mask, self.dtype)
    out = nn.with_logical_constraint(out, (ax.BATCH, ax.LENGTH, ax.HEADS, ax.HEAD_DIM))
    o, aux_out = _adapted_projections(
      self,
      "attn_out",
      out,
      demographics,
      token_mask,
      (ax.HEADS, ax.HEAD_DIM),
      {"o_proj": ((cfg.hidden_size,), (ax.EMBED,))},
      cfg.attention_bias,
    )
    if cache is None:
      return o["o_proj"], merge_aux(aux_in, aux_out)
    return o["o_proj"], merge_aux(aux_in, aux_out), cache


class MLP(_Block):
  @nn.compact
  def __call__(self, x, demographics, token_mask):
    cfg = self.config
    inner = ((cfg.intermediate_size,), (ax.MLP,))
    gate_up, aux_in = _adapted_projections(
      self,
      "mlp_in",
      x,
      demographics,
      token_mask,
      (ax.EMBED,),
      {"gate_proj": inner, "up_proj": inner},
      cfg.mlp_bias,
    )
    h = nn.silu(gate_up["gate_proj"]) * gate_up["up_proj"]
    h = nn.with_logical_constraint(h, (ax.BATCH, ax.LENGTH, ax.MLP))
    down, aux_out = _adapted_projections(
      self,
      "mlp_out",
      h,
      demographics,
      token_mask,
      (ax.MLP,),
      {"down_proj": ((cfg.hidden_size,), (ax.EMBED,))},
      cfg.mlp_bias,
    )
    return down["down_proj"], merge_aux(aux_in, aux_out)


class DecoderLayer(_Block):
  @nn.compact
  def __call__(self, x, mask, positions, demographics, token_mask, cache=None, cache_index=None):
    kwargs = dict(
      config=self.config,
      adapter=self.adapter,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      deterministic=self.deterministic,
      capture_routing=self.capture_routing,
    )
    attn, aux_attn, *new_cache = Attention(**kwargs, name="self_attn")(
      self.norm("input_layernorm")(x), mask, positions, demographics, token_mask, cache, cache_index
    )
    x = x + attn
    mlp, aux_mlp = MLP(**kwargs, name="mlp")(
      self.norm("post_attention_layernorm")(x), demographics, token_mask
    )
    x = nn.with_logical_constraint(x + mlp, (ax.BATCH, ax.LENGTH, ax.EMBED))
    if cache is None:
      return x, merge_aux(aux_attn, aux_mlp)
    return x, (merge_aux(aux_attn, aux_mlp), new_cache[0])


class Decoder(nn.Module):
  """Qwen3 / Llama decoder.

  ``apply({"params": p}, input_ids, attention_mask=m)`` returns float32 logits
  [batch, length, vocab] (or final hidden states with ``output="hidden_states"``).  With an
  adapter configured it returns ``(outputs, aux)`` where ``aux`` holds the summed balance
  loss and per-router expert-usage counts and, with ``capture_routing=True``, every
  router's per-token experts and gates (see :func:`cuma_jax.layers.group.finalize_aux`).
  """

  config: ModelConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scan_layers: bool = False
  remat: str = "none"
  output: str = "logits"
  adapter: AdapterConfig | None = None
  capture_routing: bool = False

  def setup_check(self):
    if self.output not in OUTPUTS:
      raise ValueError(f"output={self.output!r}; allowed: {OUTPUTS}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; allowed: {REMAT_POLICIES}")

  @nn.compact
  def __call__(
    self,
    input_ids,
    attention_mask=None,
    positions=None,
    demographics=None,
    deterministic: bool = True,
    logit_indices=None,
    cache=None,
    cache_index=None,
  ):
    """``logit_indices`` [batch, K]: score only these positions (the supervised tokens or
    the last prompt position), so the [batch, length, vocab] logits are never formed.

    Decoding (``cuma_jax.generation``) passes a key/value ``cache`` ({"key", "value"}:
    [layers, batch, S, kv_heads, head_dim], see :func:`init_cache`) and ``cache_index``,
    where this call's tokens are written; ``attention_mask`` [batch, S] then covers the
    whole cache and ``positions`` are required.  The call returns ``(out, aux, cache)``.
    """
    self.setup_check()
    cfg = self.config
    batch, length = input_ids.shape
    if cache is not None and (positions is None or attention_mask is None):
      raise ValueError("decoding with a cache needs positions and the cache's attention_mask")
    if attention_mask is None:
      attention_mask = jnp.ones((batch, length), jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    if self.adapter is not None:
      demographics = check_demographics(self.adapter, demographics, batch)
      if demographics is not None and self.adapter.demographic_projection:
        demographics = DemographicProjection(
          self.adapter.demographic_projection, self.adapter.param_dtype, name="adapters_demographic"
        )(demographics)
    embed = nn.Embed(
      cfg.vocab_size,
      cfg.hidden_size,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      embedding_init=_partitioned(nn.initializers.normal(0.02), (ax.VOCAB, ax.EMBED)),
      name="embed_tokens",
    )
    x = nn.with_logical_constraint(embed(input_ids), (ax.BATCH, ax.LENGTH, ax.EMBED))
    prefix_len = self.adapter.prefix_length if self.adapter is not None else 0
    if cache is None:
      mask = build_attention_mask(attention_mask, length, prefix_len)
      token_mask = attention_mask
    else:
      mask = build_attention_mask(attention_mask, length, prefix_len, query_offset=cache_index)
      token_mask = jax.lax.dynamic_slice_in_dim(attention_mask, cache_index, length, axis=1)
    x, aux = self._layers(
      x, mask, positions, demographics, token_mask, deterministic, cache, cache_index
    )
    if cache is not None:
      aux, cache = aux
    x = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="norm")(x)
    if logit_indices is not None:
      x = jnp.take_along_axis(x, logit_indices[..., None], axis=1)
    if self.output == "hidden_states":
      out = x.astype(jnp.float32)
    elif cfg.tie_word_embeddings:
      out = embed.attend(x).astype(jnp.float32)
    else:
      out = nn.DenseGeneral(
        cfg.vocab_size,
        use_bias=False,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=_partitioned(nn.initializers.normal(0.02), (ax.EMBED, ax.VOCAB)),
        name="lm_head",
      )(x).astype(jnp.float32)
    out = nn.with_logical_constraint(out, (ax.BATCH, ax.LENGTH, ax.VOCAB))
    aux = finalize_aux(aux) if self.adapter is not None else None
    if cache is not None:
      return out, aux, cache
    return out if self.adapter is None else (out, aux)

  def _layers(
    self, x, mask, positions, demographics, token_mask, deterministic, cache, cache_index
  ):
    cfg = self.config
    kwargs = dict(
      config=cfg,
      adapter=self.adapter,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      deterministic=deterministic,
      capture_routing=self.capture_routing,
    )
    # A layer maps (x, *broadcast[, cache]) -> (x, aux[, cache]): exactly nn.scan's
    # (carry, ys) contract, with each layer's cache scanned over and stacked back.
    layer_cls = DecoderLayer
    if self.remat != "none":
      policy = (
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims if self.remat == "dots" else None
      )
      layer_cls = nn.remat(layer_cls, policy=policy, prevent_cse=not self.scan_layers)
    args: tuple[Any, ...] = (x, mask, positions, demographics, token_mask)
    if cache is not None:
      args += (cache, cache_index)
    if self.scan_layers:
      in_axes = (nn.broadcast,) * 4 + ((0, nn.broadcast) if cache is not None else ())
      scanned = nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=in_axes,
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: ax.LAYERS},
      )
      return scanned(**kwargs, name="layers")(*args)
    per_layer = []
    for i in range(cfg.num_layers):
      layer_args = args[1:]
      if cache is not None:
        layer_args = (*args[1:5], jax.tree.map(lambda c, i=i: c[i], cache), cache_index)
      x, out = layer_cls(**kwargs, name=f"layers_{i}")(x, *layer_args)
      per_layer.append(out)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *per_layer) if per_layer else {}


CACHE_AXES = (ax.LAYERS, ax.BATCH, ax.LENGTH, ax.KV_HEADS, ax.HEAD_DIM)


def init_cache(config: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
  """An empty key/value cache for ``length`` positions: {"key", "value"} of shape
  [layers, batch, length, kv_heads, head_dim], on the logical axes ``CACHE_AXES`` (under
  an active layout, split like the attention it serves)."""
  shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
  return {
    name: nn.with_logical_constraint(jnp.zeros(shape, dtype), CACHE_AXES)
    for name in ("key", "value")
  }
