"""Grain input pipeline: survey examples -> tokenised, shuffled, sharded numpy batches.

Every batch is a dict of numpy arrays (B = batch size, L = max_length):

    input_ids, attention_mask, targets, loss_mask   [B, L] int32 (see tokenize.py: targets[t] is
                                                    input_ids[t + 1]; loss_mask marks the
                                                    supervised answer targets)
    prompt_length        [B] index of the last prompt token, where evaluation reads the logits
    truncated_tokens     [B] prompt tokens dropped to fit max_length (0 almost always)
    profile_index        [B] row of `SurveyTables.profiles` (sorted distinct profile strings),
                         so the demographic encoder embeds each distinct profile once
    question_index       [B] row of `SurveyTables.question_ids`
    answer_option        [B] index of the true option (its letter is LETTERS[answer_option])
    option_count         [B] number of options of the question
    option_codes         [B, MAX_OPTIONS] WVS answer code of each option, -1 past option_count
    example_index        [B] index of the example in the source

The order is a function of (seed, shard) only: the source indices are split across processes
(index % shard_count == shard_index), shuffled with `seed` (reshuffled each epoch), repeated,
mapped and batched. The iterator's `get_state()`/`set_state()` is a step counter, so a restored
iterator continues with exactly the batches the original would have produced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

import grain
import jax
import numpy as np

from cuma_jax.data import prompts
from cuma_jax.data.profile_questions import ProfileQuestions
from cuma_jax.data.tokenize import END_OF_TURN, ChatEncoder, Features


@dataclasses.dataclass(frozen=True)
class SurveyTables:
  """Lookup tables the integer indices in a batch refer to."""

  profiles: tuple[str, ...]  # sorted distinct profile strings of the source
  question_ids: tuple[str, ...]

  @classmethod
  def of(cls, source: Sequence[dict[str, Any]]) -> SurveyTables:
    """From a TFDS source's metadata (written by builders.py), else by reading every record."""
    info = getattr(source, "dataset_info", None)
    metadata = (info.metadata or {}) if info is not None else {}
    split = str(getattr(source, "split", "")).split("[")[0]  # "train[:10%]" -> "train"
    if split in metadata.get("profiles", {}):
      return cls(
        profiles=tuple(metadata["profiles"][split]),
        question_ids=tuple(q["question_id"] for q in metadata["questions"]),
      )
    records = [source[i] for i in range(len(source))]
    return cls(
      profiles=tuple(sorted({as_text(r["profile"]) for r in records})),
      question_ids=tuple(dict.fromkeys(as_text(r["question_id"]) for r in records)),
    )


def as_text(value: str | bytes) -> str:
  """TFDS returns Text features as bytes; plain Python sources hold str."""
  return value.decode("utf-8") if isinstance(value, bytes) else value


class _EncodeExample:
  """Source index -> one tokenised example (a picklable callable, for grain workers)."""

  def __init__(
    self,
    source,
    tokenizer,
    tables: SurveyTables,
    max_length: int,
    demographic_system_prompt: bool,
    supervision: str,
  ):
    self.source = source
    self.encoder = ChatEncoder(tokenizer, max_length, supervision)
    self.profile_index = {p: i for i, p in enumerate(tables.profiles)}
    self.question_index = {q: i for i, q in enumerate(tables.question_ids)}
    self.demographic_system_prompt = demographic_system_prompt

  def __call__(self, index: int) -> Features:
    record = self.source[int(index)]
    profile = as_text(record["profile"])
    system = prompts.system_prompt(profile, self.demographic_system_prompt)
    encoded = self.encoder(
      prompts.chat_messages(system, as_text(record["user"])), as_text(record["answer_letter"])
    )
    codes = np.full(prompts.MAX_OPTIONS, -1, np.int32)
    option_codes = np.asarray(record["option_codes"], np.int32)
    codes[: len(option_codes)] = option_codes
    return {
      **encoded,
      "profile_index": np.int32(self.profile_index[profile]),
      "question_index": np.int32(self.question_index[as_text(record["question_id"])]),
      "answer_option": np.int32(record["answer_option"]),
      "option_count": np.int32(len(option_codes)),
      "option_codes": codes,
      "example_index": np.int32(index),
    }


class _WithProfileQuestions:
  """Indices below the survey's length -> its examples (training keys only); the rest ->
  questions about a profile's own fields, asked under that profile's system prompt, each
  repeated until they are about as many as the survey's examples (half of every epoch)."""

  KEYS = (
    "input_ids",
    "attention_mask",
    "targets",
    "loss_mask",
    "prompt_length",
    "truncated_tokens",
    "profile_index",
  )

  def __init__(self, survey: _EncodeExample, num_survey: int, questions: ProfileQuestions):
    self.survey, self.num_survey, self.questions = survey, num_survey, questions
    self.num_questions = len(questions) * max(1, round(num_survey / len(questions)))

  def __call__(self, index: int) -> Features:
    if index < self.num_survey:
      example = self.survey(index)
      return {k: example[k] for k in self.KEYS}
    question = self.questions[(int(index) - self.num_survey) % len(self.questions)]
    encoded = self.survey.encoder(
      prompts.chat_messages(question.system, question.user), question.answer
    )
    return {**encoded, "profile_index": np.int32(0)}


def make_dataset(
  source: Sequence[dict[str, Any]],
  tokenizer,
  *,
  max_length: int,
  batch_size: int,
  seed: int = 0,
  shuffle: bool = True,
  num_epochs: int | None = 1,
  demographic_system_prompt: bool = False,
  supervision: str = END_OF_TURN,
  shard_index: int | None = None,
  shard_count: int | None = None,
  drop_remainder: bool = True,
  tables: SurveyTables | None = None,
  profile_questions: ProfileQuestions | None = None,
) -> tuple[grain.IterDataset, SurveyTables]:
  """Builds the batched dataset over `source` (a TFDS data source or a list of example dicts).

  num_epochs=None repeats forever. shard_index/shard_count default to this JAX process's index
  and the process count. ``profile_questions`` are mixed in, repeated to about as many as the
  survey's examples (a warm-up's; the batches then hold the training keys only). Returns the dataset (iterate it;
  its iterator checkpoints with get_state/set_state) and the tables its indices refer to.
  """
  tables = SurveyTables.of(source) if tables is None else tables
  survey = _EncodeExample(
    source, tokenizer, tables, max_length, demographic_system_prompt, supervision
  )
  encode: Callable[[int], Features] = survey
  num_examples = len(source)
  if profile_questions is not None:
    mixed = _WithProfileQuestions(survey, num_examples, profile_questions)
    encode, num_examples = mixed, num_examples + mixed.num_questions
  dataset = batched(
    num_examples,
    encode,
    batch_size=batch_size,
    seed=seed,
    shuffle=shuffle,
    num_epochs=num_epochs,
    shard_index=shard_index,
    shard_count=shard_count,
    drop_remainder=drop_remainder,
  )
  return dataset, tables


def batched(
  num_examples: int,
  encode: Callable[[int], Features],
  *,
  batch_size: int,
  seed: int = 0,
  shuffle: bool = True,
  num_epochs: int | None = 1,
  shard_index: int | None = None,
  shard_count: int | None = None,
  drop_remainder: bool = True,
) -> grain.IterDataset:
  """Source indices 0..num_examples-1 sharded by process, shuffled, repeated, encoded by
  ``encode(index) -> dict of arrays`` and batched (the order is a function of seed and shard)."""
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} outside 0..{shard_count - 1}")
  indices = grain.MapDataset.range(num_examples)[shard_index::shard_count]
  if len(indices) == 0:
    raise ValueError(
      f"shard {shard_index} of {shard_count} of a {num_examples}-example source is empty"
    )
  if shuffle:
    indices = indices.shuffle(seed=seed)
  return (
    indices.repeat(num_epochs)
    .map(encode)
    .batch(batch_size, drop_remainder=drop_remainder)
    .to_iter_dataset()
  )
