"""Chat-template tokenisation of one survey example into fixed-length training arrays.

What is supervised: docs/data.md#supervision.

The sequence is the prompt exactly as evaluation renders it (system + user, generation prompt,
enable_thinking=False: for Qwen3 the header is followed by the empty think block) followed by
the answer tokens. Which ones, and which of them are supervised, is `supervision`:

- END_OF_TURN (default): the letter and the end-of-turn token. Whatever the template renders
  after the end-of-turn token (Qwen3's trailing "\\n") is neither supervised nor kept.
- RELEASED: as the released training: every token the template writes after the assistant
  header, except those equal to the padding id, which it masks. Qwen3: letter, <|im_end|>,
  "\\n"; Llama 3, whose tokenizer has no padding token and so pads with <|eot_id|>: the letter.

Shift convention (next-token): `targets[t] = input_ids[t + 1]`, and `loss_mask[t] = 1` exactly
where `targets[t]` is a supervised answer token. `prompt_length` is the index of the LAST
prompt token: the logits there predict the letter (`targets[prompt_length]` is the letter, its
loss_mask is 1), which is where evaluation reads them.

An example longer than max_length loses tokens from the left of the prompt (the system turn
first) so that the answer and the generation header are always kept; `truncated_tokens` says
how many were dropped, for the caller to count and report.
"""

from __future__ import annotations

from collections.abc import Sequence
import logging
from typing import TypeAlias

import numpy as np

logger = logging.getLogger(__name__)

END_OF_TURN = "answer_and_end_of_turn"
RELEASED = "released"
SUPERVISION = (END_OF_TURN, RELEASED)

# One encoded example: token arrays, and per-example counts and indices as numpy scalars
# (batching stacks both alike).
Features: TypeAlias = dict[str, np.ndarray | np.integer]


def _special_ids(tokenizer) -> frozenset[int]:
  """Ids of the tokenizer's special added tokens (Qwen3 <|im_end|>, Llama 3 <|eot_id|>, ...)."""
  special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
  return frozenset(special | set(tokenizer.all_special_ids))


def pad_id(tokenizer) -> int:
  """The padding id; Llama-style tokenizers without one pad with EOS (always masked anyway)."""
  if tokenizer.pad_token_id is not None:
    return tokenizer.pad_token_id
  if tokenizer.eos_token_id is None:
    raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
  return tokenizer.eos_token_id


def render_prompt(tokenizer, messages: Sequence[dict[str, str]]) -> str:
  """The evaluation prompt: the messages plus the assistant header, thinking disabled."""
  return tokenizer.apply_chat_template(
    list(messages), tokenize=False, add_generation_prompt=True, enable_thinking=False
  )


class ChatEncoder:
  """Encodes (messages, answer) pairs for one tokenizer into fixed-length numpy arrays."""

  def __init__(self, tokenizer, max_length: int, supervision: str = END_OF_TURN):
    if supervision not in SUPERVISION:
      raise ValueError(f"supervision={supervision!r}; must be one of {SUPERVISION}")
    self.tokenizer = tokenizer
    self.max_length = max_length
    self.supervision = supervision
    self.pad_id = pad_id(tokenizer)
    self.special_ids = _special_ids(tokenizer)
    self._warned_truncation = False

  def tokens(self, messages: Sequence[dict[str, str]], answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, supervised answer ids) of the conversation ``messages`` + ``answer``.

    The prompt is the evaluation prompt; the answer ids are the reply and its end-of-turn
    token (and, with ``RELEASED`` supervision, what the template writes after it).
    """
    tok = self.tokenizer
    prompt_text = render_prompt(tok, messages)
    full_text = tok.apply_chat_template(
      [*messages, {"role": "assistant", "content": answer}], tokenize=False
    )
    if not full_text.startswith(prompt_text):
      raise ValueError(
        "the chat template renders the conversation with its answer differently from the "
        "evaluation prompt, so training and evaluation prompts would disagree.\n"
        f"prompt: {prompt_text!r}\nfull:   {full_text!r}"
      )
    prompt_ids = tok.encode(prompt_text, add_special_tokens=False)
    full_ids = tok.encode(full_text, add_special_tokens=False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
      raise ValueError(
        "tokenising the prompt alone and the prompt followed by its answer splits the "
        f"prompt differently at the boundary: {prompt_ids[-4:]} vs "
        f"{full_ids[len(prompt_ids) - 4 : len(prompt_ids) + 2]} for {prompt_text[-40:]!r}"
      )
    completion = full_ids[len(prompt_ids) :]
    end = next((i for i, t in enumerate(completion) if t in self.special_ids), None)
    if end is None or end == 0:
      raise ValueError(
        f"no answer followed by an end-of-turn special token after the prompt: "
        f"{tok.convert_ids_to_tokens(completion)}"
      )
    return prompt_ids, completion[: end + 1] if self.supervision == END_OF_TURN else completion

  def __call__(self, messages: Sequence[dict[str, str]], answer: str) -> Features:
    """`messages` are the system and user turns; `answer` is the assistant's reply (a letter).

    Returns input_ids, attention_mask, targets, loss_mask ([max_length] int32) and the int32
    scalars prompt_length and truncated_tokens.
    """
    prompt_ids, answer_ids = self.tokens(messages, answer)
    keep = self.max_length - len(answer_ids)
    if keep < 1:
      raise ValueError(f"max_length={self.max_length} cannot hold the answer and a prompt")
    truncated = max(0, len(prompt_ids) - keep)
    if truncated:
      prompt_ids = prompt_ids[truncated:]
      if not self._warned_truncation:
        self._warned_truncation = True
        logger.warning(
          "max_length=%d: dropped the first %d prompt tokens of an example "
          "(further truncations are only counted in truncated_tokens)",
          self.max_length,
          truncated,
        )
    ids = prompt_ids + answer_ids
    n = len(ids)

    input_ids = np.full(self.max_length, self.pad_id, np.int32)
    input_ids[:n] = ids
    targets = np.full(self.max_length, self.pad_id, np.int32)
    targets[: n - 1] = ids[1:]
    attention_mask = np.zeros(self.max_length, np.int32)
    attention_mask[:n] = 1
    loss_mask = np.zeros(self.max_length, np.int32)
    loss_mask[len(prompt_ids) - 1 : n - 1] = 1
    if self.supervision == RELEASED:
      loss_mask[targets == self.pad_id] = 0
    return {
      "input_ids": input_ids,
      "attention_mask": attention_mask,
      "targets": targets,
      "loss_mask": loss_mask,
      "prompt_length": np.int32(len(prompt_ids) - 1),
      "truncated_tokens": np.int32(truncated),
    }
