"""Text generation over a preallocated key/value cache: one jitted prefill, one jitted
decode loop (``jax.lax.while_loop``), greedy or sampled, batched with left or right padding.

The routers see each sequence's demographic vector at every step (the profile belongs to
the sequence), so CuMA, its variants and prefix tuning decode exactly as they train.
Prompts are aligned to the right (left padding) before prefill, so every row writes its new
tokens at the same cache index; positions follow each row's own real tokens, as Hugging
Face's ``generate`` does with left padding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from cuma_jax import fields
from cuma_jax.fields import field
from cuma_jax.models.decoder import init_cache
from cuma_jax.sharding import Layout


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How tokens are chosen.  ``temperature`` 0 is greedy (argmax); otherwise logits are
  divided by it, then restricted to the ``top_k`` most probable (0: all) and to the smallest
  set whose probability reaches ``top_p``, and sampled."""

  max_new_tokens: int = field(32, low=1)
  temperature: float = field(0.0, low=0)
  top_k: int = field(0, low=0)
  top_p: float = field(1.0, low=0, low_open=True, high=1)
  # Generation of a row ends after it emits one of these (e.g. the chat's end-of-turn).
  stop_tokens: tuple[int, ...] = field((), low=0)
  pad_token: int = field(0, low=0)  # written after a row has stopped

  def __post_init__(self):
    object.__setattr__(self, "stop_tokens", tuple(self.stop_tokens))
    fields.check(self, "sampling")


@dataclasses.dataclass
class Generation:
  tokens: np.ndarray  # [B, max_new_tokens], pad_token after a row's stop token
  lengths: np.ndarray  # [B] generated tokens per row, its stop token included
  logits: np.ndarray | None  # [B, max_new_tokens, V] float32, with return_logits


# Prompt widths are rounded up to a multiple of this, so that a few shapes (hence
# compilations) serve every batch of prompts.
LENGTH_MULTIPLE = 64


def pad_prompts(prompts, *, rows: int, pad_token: int, multiple: int = LENGTH_MULTIPLE):
  """Token-id lists -> right-padded ids and mask [rows, width]; the width is the longest
  prompt rounded up to ``multiple`` and missing rows repeat the first prompt."""
  if not 0 < len(prompts) <= rows:
    raise ValueError(f"{len(prompts)} prompts for a batch of {rows} rows")
  width = multiple * -(-max(map(len, prompts)) // multiple)
  ids = np.full((rows, width), pad_token, np.int32)
  mask = np.zeros((rows, width), np.int32)
  for row in range(rows):
    prompt = prompts[row] if row < len(prompts) else prompts[0]
    ids[row, : len(prompt)] = prompt
    mask[row, : len(prompt)] = 1
  return ids, mask


def align_right(input_ids: np.ndarray, attention_mask: np.ndarray, pad_token: int):
  """Moves every row's real tokens to the end (left padding), whatever the padding side.

  Each row's real tokens must be contiguous (left- or right-padded).
  """
  input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask)
  lengths = attention_mask.sum(1)
  length = input_ids.shape[1]
  starts = np.argmax(attention_mask, axis=1)
  for row, (start, n) in enumerate(zip(starts, lengths, strict=True)):
    if not attention_mask[row, start : start + n].all():
      raise ValueError(f"row {row} of attention_mask is not one contiguous block of tokens")
  if np.any(lengths == 0):
    raise ValueError(f"rows {np.flatnonzero(lengths == 0).tolist()} have no token")
  source = (starts[:, None] + np.arange(length)[None, :] - (length - lengths)[:, None]) % length
  ids = np.take_along_axis(input_ids, source, axis=1)
  mask = (np.arange(length)[None, :] >= (length - lengths)[:, None]).astype(np.int32)
  return np.where(mask == 1, ids, pad_token).astype(np.int32), mask


def choose(logits: jax.Array, sampling: SamplingConfig, rng) -> jax.Array:
  """[B, V] float32 logits -> [B] int32 tokens."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    # Keep a token while the mass of the tokens ranked above it is still below top_p.
    keep_sorted = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(len(order))[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _forward(module, params, ids, mask, positions, z, cache, index):
  out = module.apply(
    {"params": params},
    ids,
    attention_mask=mask,
    positions=positions,
    demographics=z,
    cache=cache,
    cache_index=index,
    logit_indices=jnp.full((ids.shape[0], 1), ids.shape[1] - 1, jnp.int32),
  )
  logits, _, cache = out
  return logits[:, 0], cache


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _prefill(module, params, ids, mask, z, cache_dtype, total):
  batch, prompt = ids.shape
  cache = init_cache(module.config, batch, total, cache_dtype)
  full_mask = jnp.concatenate([mask, jnp.zeros((batch, total - prompt), mask.dtype)], axis=1)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  logits, cache = _forward(module, params, ids, full_mask, positions, z, cache, 0)
  return logits, cache, full_mask, positions[:, -1]


@functools.partial(jax.jit, static_argnums=(0, 1, 8))
def _decode(
  module, sampling, params, logits, cache, full_mask, last_position, z, return_logits, rng
):
  batch, total = full_mask.shape
  prompt = total - sampling.max_new_tokens
  stop = jnp.asarray(sampling.stop_tokens or (-1,), jnp.int32)
  vocab = logits.shape[-1]
  state = dict(
    step=jnp.zeros((), jnp.int32),
    logits=logits,
    cache=cache,
    mask=full_mask,
    done=jnp.zeros((batch,), bool),
    tokens=jnp.full((batch, sampling.max_new_tokens), sampling.pad_token, jnp.int32),
    lengths=jnp.zeros((batch,), jnp.int32),
    all_logits=jnp.zeros((batch, sampling.max_new_tokens if return_logits else 0, vocab)),
  )

  def cond(s):
    return (s["step"] < sampling.max_new_tokens) & ~jnp.all(s["done"])

  def body(s):
    step = s["step"]
    token = choose(s["logits"], sampling, jax.random.fold_in(rng, step))
    token = jnp.where(s["done"], sampling.pad_token, token)
    tokens = s["tokens"].at[:, step].set(token)
    lengths = s["lengths"] + (~s["done"]).astype(jnp.int32)
    all_logits = s["all_logits"]
    if return_logits:
      all_logits = all_logits.at[:, step].set(s["logits"])
    done = s["done"] | jnp.any(token[:, None] == stop[None, :], axis=-1)
    index = prompt + step
    mask = s["mask"].at[:, index].set(1)
    positions = (last_position + 1 + step)[:, None]
    logits, cache = _forward(module, params, token[:, None], mask, positions, z, s["cache"], index)
    return dict(
      step=step + 1,
      logits=logits,
      cache=cache,
      mask=mask,
      done=done,
      tokens=tokens,
      lengths=lengths,
      all_logits=all_logits,
    )

  s = jax.lax.while_loop(cond, body, state)
  return s["tokens"], s["lengths"], s["all_logits"]


def generate(
  module,
  params,
  input_ids,
  attention_mask,
  sampling: SamplingConfig,
  *,
  demographics=None,
  rng=None,
  return_logits: bool = False,
  layout: Layout | None = None,
) -> Generation:
  """Continues each prompt of the batch; ``demographics`` [B, d] when the routers read them.

  ``rng`` (a PRNG key) is required when sampling (temperature > 0).  With ``layout`` (the
  training's mesh and rules; ``params`` placed by it), the batch, the key/value cache and
  the activations are split by the same logical rules as training.
  """
  if sampling.temperature > 0 and rng is None:
    raise ValueError("sampling with temperature > 0 needs an explicit rng key")
  rng = jax.random.key(0) if rng is None else rng
  ids, mask = align_right(input_ids, attention_mask, sampling.pad_token)
  total = ids.shape[1] + sampling.max_new_tokens
  z = None if demographics is None else jnp.asarray(demographics, jnp.float32)
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  with layout.active() if layout is not None else contextlib.nullcontext():
    if layout is not None:
      ids, mask, z = (x if x is None else jax.device_put(x, layout.batch) for x in (ids, mask, z))
    logits, cache, full_mask, last_position = _prefill(
      module, params, ids, mask, z, module.dtype, total
    )
    tokens, lengths, all_logits = _decode(
      module, sampling, params, logits, cache, full_mask, last_position, z, return_logits, rng
    )
  return Generation(
    tokens=np.asarray(tokens),
    lengths=np.asarray(lengths),
    logits=np.asarray(all_logits) if return_logits else None,
  )
