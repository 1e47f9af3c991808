"""Preference records -> fixed-length token arrays for chat SFT, DPO and generation prompts.

See docs/preference.md#batches.  Every sequence is the conversation rendered by the
tokenizer's chat template (generation header, thinking disabled) followed by a completion:
the reply and its end-of-turn token (with ``supervision="released"``, also what the
template writes after it, e.g. Qwen3's "\\n").  Only the completion is supervised, so chat
SFT trains the final reply of a thread and nothing before its last assistant header.

Lengths: a completion keeps at most ``max_completion`` tokens (its start: a longer reply
loses its end, as the released training truncates on the right), and the prompt keeps its
LAST tokens, at most ``max_prompt`` and what fits in ``max_length`` beside the completion,
so the generation header is never cut. Chat SFT may instead cut the whole thread's end at
``max_length``, as the released chat SFT does (``truncation="thread_end"``).  Batches (B rows, L = max_length):

    SFT:    input_ids, attention_mask, targets, loss_mask [B, L]; profile_index [B]
    DPO:    the same arrays as [B, 2, L] (chosen, rejected); profile_index [B]
    prompt: input_ids, attention_mask [B, max_prompt] (right padded); profile_index,
            example_index [B]
    every batch also carries truncated_tokens [B]: tokens any truncation dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import re
from typing import Any

import numpy as np

from cuma_jax.data.pipeline import as_text, batched
from cuma_jax.data.tokenize import END_OF_TURN, ChatEncoder, Features, render_prompt


def profile_table(source) -> tuple[str, ...]:
  """The sorted distinct profiles of a prepared preference split (its metadata)."""
  split = str(source.split).split("[")[0]
  return tuple(source.dataset_info.metadata["profiles"][split])


def messages_of(record) -> list[dict[str, str]]:
  return json.loads(as_text(record["messages"]))


def context_of(messages: Sequence[dict[str, str]]) -> str:
  """What a judge reads of the conversation: its turns after the system turn."""
  return "\n".join(f"{m['role']}: {m['content']}" for m in messages if m["role"] != "system")


def strip_think(text: str) -> str:
  """A reply without its think and tool-call blocks (a judge never reads them)."""
  return _HIDDEN_BLOCKS.sub("", text).strip()


_HIDDEN_BLOCKS = re.compile(r"<think>.*?</think>|<tool_call>.*?</tool_call>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Lengths:
  max_length: int
  max_prompt: int
  max_completion: int

  def __post_init__(self):
    if not (1 <= self.max_prompt < self.max_length and 1 <= self.max_completion < self.max_length):
      raise ValueError(
        f"lengths {self}: need 1 <= max_prompt < max_length and 1 <= max_completion < "
        "max_length, so that a prompt token and a completion token always fit"
      )


# How a chat SFT row too long for max_length is cut: "prompt_start" drops the prompt's first
# tokens (the reply kept); "thread_end" right-truncates the whole thread, as the released
# chat SFT does (a long thread loses its reply's end, or all of it, and then trains nothing).
SFT_TRUNCATIONS = ("prompt_start", "thread_end")


def sequence_arrays(
  prompt_ids: Sequence[int],
  completion_ids: Sequence[int],
  lengths: Lengths,
  pad: int,
  truncation: str = "prompt_start",
) -> Features:
  """One right-padded sequence whose completion targets are marked in ``loss_mask``; the
  completion keeps at most ``max_completion`` tokens, then ``truncation`` cuts the rest."""
  completion = list(completion_ids[: lengths.max_completion])
  if truncation == "thread_end":
    prompt = list(prompt_ids[: lengths.max_length])
    completion = completion[: lengths.max_length - len(prompt)]
  else:
    keep = min(lengths.max_prompt, lengths.max_length - len(completion))
    prompt = list(prompt_ids[-keep:])
  dropped = len(prompt_ids) - len(prompt) + len(completion_ids) - len(completion)
  ids = prompt + completion
  n, length = len(ids), lengths.max_length
  input_ids = np.full(length, pad, np.int32)
  input_ids[:n] = ids
  targets = np.full(length, pad, np.int32)
  targets[: n - 1] = ids[1:]
  attention_mask = (np.arange(length) < n).astype(np.int32)
  loss_mask = np.zeros(length, np.int32)
  loss_mask[len(prompt) - 1 : n - 1] = 1  # empty when the thread's end cut the whole reply
  return {
    "input_ids": input_ids,
    "attention_mask": attention_mask,
    "targets": targets,
    "loss_mask": loss_mask,
    "truncated_tokens": np.int32(dropped),
  }


class _Encode:
  """Source index -> arrays (a picklable callable, for grain workers)."""

  def __init__(
    self, source, tokenizer, profiles, lengths: Lengths, supervision: str, truncation: str
  ):
    self.source = source
    self.truncation = truncation
    self.encoder = ChatEncoder(tokenizer, lengths.max_length, supervision)
    self.profile_index = {p: i for i, p in enumerate(profiles)}
    self.lengths = lengths

  def common(self, index: int, record) -> Features:
    return {
      "profile_index": np.int32(self.profile_index[as_text(record["profile"])]),
      "example_index": np.int32(index),
    }


class SftExample(_Encode):
  """The whole thread; the final assistant reply is the completion.

  ``profile_blind``: the profile in the messages is replaced by that of another record (a
  fixed random pairing), so a model trained on it learns that a profile is present but
  nothing of what it implies (the tiny backbone's warm-up).
  """

  def __init__(self, *args, profile_blind: bool = False):
    super().__init__(*args)
    self.pairing = _other_profile_pairing(self.source) if profile_blind else None

  def __call__(self, index: int) -> Features:
    record = self.source[int(index)]
    *prompt, reply = messages_of(record)
    if self.pairing is not None:
      own = as_text(record["profile"])
      other = as_text(self.source[int(self.pairing[index])]["profile"])
      prompt = [{**m, "content": m["content"].replace(own, other)} if own else m for m in prompt]
    if reply["role"] != "assistant":
      raise ValueError(f"SFT record {as_text(record['id'])} does not end with a reply")
    prompt_ids, completion = self.encoder.tokens(prompt, reply["content"])
    arrays = sequence_arrays(
      prompt_ids, completion, self.lengths, self.encoder.pad_id, self.truncation
    )
    return {**arrays, **self.common(index, record)}


class DpoExample(_Encode):
  """The prompt followed by the chosen and by the rejected reply: arrays [2, L]."""

  def __call__(self, index: int) -> Features:
    record = self.source[int(index)]
    prompt = messages_of(record)
    pair = []
    for key in ("chosen", "rejected"):
      prompt_ids, completion = self.encoder.tokens(prompt, as_text(record[key]))
      pair.append(sequence_arrays(prompt_ids, completion, self.lengths, self.encoder.pad_id))
    arrays = {k: np.stack([pair[0][k], pair[1][k]]) for k in pair[0]}
    arrays["truncated_tokens"] = arrays["truncated_tokens"].sum()
    return {**arrays, **self.common(index, record)}


class PromptExample(_Encode):
  """The generation prompt of a DPO record (its LAST ``max_prompt`` tokens), right padded."""

  def __call__(self, index: int) -> Features:
    record = self.source[int(index)]
    text = render_prompt(self.encoder.tokenizer, messages_of(record))
    ids = self.encoder.tokenizer.encode(text, add_special_tokens=False)
    kept = ids[-self.lengths.max_prompt :]
    input_ids = np.full(self.lengths.max_prompt, self.encoder.pad_id, np.int32)
    input_ids[: len(kept)] = kept
    return {
      "input_ids": input_ids,
      "attention_mask": (np.arange(self.lengths.max_prompt) < len(kept)).astype(np.int32),
      "truncated_tokens": np.int32(len(ids) - len(kept)),
      **self.common(index, record),
    }


def _other_profile_pairing(source) -> np.ndarray:
  """For each record, another record with a DIFFERENT profile: the next such record along a
  fixed random order of the records."""
  profiles = [as_text(source[i]["profile"]) for i in range(len(source))]
  if len(set(profiles)) < 2:
    raise ValueError("profile-blind rows need records of at least two distinct profiles")
  order = np.random.default_rng(0).permutation(len(profiles))
  pairing = np.empty(len(profiles), np.int64)
  for position, index in enumerate(order):
    step = 1
    while profiles[order[(position + step) % len(order)]] == profiles[index]:
      step += 1
    pairing[index] = order[(position + step) % len(order)]
  return pairing


EXAMPLES = {"sft": SftExample, "dpo": DpoExample, "prompt": PromptExample}


def make_chat_dataset(
  kind: str,
  source,
  tokenizer,
  lengths: Lengths,
  *,
  batch_size: int,
  profiles: Sequence[str] | None = None,
  supervision: str = END_OF_TURN,
  profile_blind: bool = False,
  truncation: str = "prompt_start",
  **batching: Any,
):
  """Batches of ``kind`` ("sft", "dpo" or "prompt") over a preference split; ``batching``:
  seed, shuffle, num_epochs, shard_index, shard_count, drop_remainder (see ``batched``);
  ``profile_blind``: SFT rows under other users' profiles (see :class:`SftExample`);
  ``truncation``: how an SFT row too long is cut (``SFT_TRUNCATIONS``; DPO always keeps
  its prompt's end)."""
  if kind not in EXAMPLES:
    raise ValueError(f"kind={kind!r}; allowed: {tuple(EXAMPLES)}")
  if truncation not in SFT_TRUNCATIONS:
    raise ValueError(f"truncation={truncation!r}; allowed: {SFT_TRUNCATIONS}")
  if (profile_blind or truncation != "prompt_start") and kind != "sft":
    raise ValueError("profile_blind and truncation apply to kind='sft' only")
  profiles = profile_table(source) if profiles is None else profiles
  args = (source, tokenizer, profiles, lengths, supervision, truncation)
  encode = SftExample(*args, profile_blind=True) if profile_blind else EXAMPLES[kind](*args)
  return batched(len(source), encode, batch_size=batch_size, **batching)
