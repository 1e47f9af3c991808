"""Turning next-token logits into multiple-choice predictions (docs/evaluation.md#prediction).

The model's answer to a WVB question is read off the logits at the last prompt position
(right after the assistant header), restricted to the letters of that question's valid
options, so the model can never "answer" with a letter the question does not have.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from cuma_jax.errors import Refusal


def _option_logits(
  last_logits: jax.Array, option_token_ids: jax.Array, option_mask: jax.Array
) -> jax.Array:
  """[B, max_options] float32 logits of each option's letter token, -inf for padded options."""
  gathered = jnp.take_along_axis(last_logits, option_token_ids, axis=-1)
  return jnp.where(option_mask, gathered.astype(jnp.float32), -jnp.inf)


def restricted_argmax(
  last_logits: jax.Array, option_token_ids: jax.Array, option_mask: jax.Array
) -> jax.Array:
  """Index (into the option axis) of the highest-scoring valid option, shape [B].

  Args:
    last_logits: [B, V] logits at the last prompt position.
    option_token_ids: [B, max_options] int token id of each option's letter; padded entries
      may hold any id in [0, V) since they are masked out.
    option_mask: [B, max_options] bool, True for the options the question actually has.
      Every row needs at least one True entry.

  Tokens outside the options, however high their logit, are never chosen.
  """
  return jnp.argmax(_option_logits(last_logits, option_token_ids, option_mask), axis=-1)


class NonFiniteLogits(Refusal, FloatingPointError):
  pass


def nonfinite_rows(
  last_logits: jax.Array, option_token_ids: jax.Array, option_mask: jax.Array
) -> jax.Array:
  """[B] bool: whether any of the question's options has an inf or NaN logit (an argmax
  over them would be an answer the model never gave)."""
  gathered = jnp.take_along_axis(last_logits, option_token_ids, axis=-1)
  return jnp.any(option_mask & ~jnp.isfinite(gathered), axis=-1)


def refuse_nonfinite(count: int, total: int, where: str) -> None:
  """Raises :class:`NonFiniteLogits` naming ``where`` when ``count`` examples had them."""
  if count:
    raise NonFiniteLogits(
      f"{count} of {total} examples of {where} have inf or NaN option logits; refusing to "
      "score them (the parameters, or the backbone in this dtype, overflow: check the "
      "checkpoint and model.dtype)"
    )


def option_log_probs(
  last_logits: jax.Array, option_token_ids: jax.Array, option_mask: jax.Array
) -> jax.Array:
  """Log-softmax over the valid options only, shape [B, max_options] (float32).

  The model's probability mass is renormalised over the question's option letters, giving a
  per-participant answer distribution for distributional metrics; padded options get -inf
  (probability 0). Arguments as in :func:`restricted_argmax`.
  """
  return jax.nn.log_softmax(_option_logits(last_logits, option_token_ids, option_mask), axis=-1)


def letter_token_ids(tokenizer, letters: Sequence[str]) -> list[int]:
  """Token id of each option letter as it appears right after the assistant header.

  The letter follows a newline there, so it is encoded on its own without special tokens.
  Restricted argmax compares one logit per option, which is only meaningful if every letter
  is exactly one known token; otherwise a ValueError names the offending letter.

  Args:
    tokenizer: a Hugging Face tokenizer.
    letters: the option letters, e.g. "ABCDEFGHIJ".
  """
  ids = []
  for letter in letters:
    encoded = tokenizer.encode(letter, add_special_tokens=False)
    if len(encoded) != 1:
      raise ValueError(f"option letter {letter!r} is not a single token: encodes to {encoded}")
    if tokenizer.unk_token_id is not None and encoded[0] == tokenizer.unk_token_id:
      raise ValueError(f"option letter {letter!r} is not in the vocabulary (unknown token)")
    ids.append(encoded[0])
  return ids
