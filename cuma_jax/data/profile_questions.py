"""Questions about a profile's own fields: a warm-up that teaches a backbone to read profiles.

Why: a text-only baseline can use the demographic system prompt only if its backbone attends to
it. A backbone warmed up on the survey without profiles has never needed to. These multiple-choice
questions ("Which country is this person from?") are answered from the system prompt alone, so a
warm-up that mixes them in teaches reading the profile without showing any culture's answers to
the survey (docs/data.md#profile-reading-warm-up).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

from cuma_jax.data import prompts

# What the questions look like and how many a warm-up mixes in; recorded in the digest of a backbone warmed up on them, so a
# backbone warmed up on another form of them is not reused.
FORMAT = "sorted_choices_half_v1"
# The question asked of each profile field, in the order of prompts.PROFILE_FIELDS.
FIELD_QUESTIONS = {
  "country": "Which country is this person from",
  "age_group": "Which age group is this person in",
  "gender": "What is this person's gender",
  "education": "What is this person's education",
  "marital_status": "What is this person's marital status",
  "religion": "What is this person's religion",
  "ethnicity": "What is this person's ethnicity",
  "employment": "What is this person's employment",
}


def profile_fields(records: Sequence[Mapping]) -> dict[str, dict[str, str]]:
  """Each distinct profile sentence of ``records`` -> its field values (as the sentence
  states them), from the records' ``demographics``."""
  text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else v  # noqa: E731
  return {
    text(r["profile"]): {f: text(r["demographics"][f]) for f in prompts.PROFILE_FIELDS}
    for r in records
  }


class ProfileQuestion(NamedTuple):
  system: str  # the profile sentence
  user: str  # the question, its lettered choices and the instruction
  answer: str  # the letter of the profile's own value
  num_choices: int


class ProfileQuestions:
  """Index -> the :class:`ProfileQuestion` about one field of one profile.

  A field's choices are all its values among the profiles, in sorted order, so answering is
  a lookup of the profile's own value, as answering a survey question from the profile is
  (a shuffled subset would make it a string match that a tiny backbone learns far slower).
  Fields with more values than letters (e.g. ethnicity, which names its country) are not
  asked. Index ``i`` asks the ``i % F``-th asked field of profile ``i // F`` (sorted).
  """

  def __init__(self, fields_by_profile: Mapping[str, Mapping[str, str]]):
    if not fields_by_profile:
      raise ValueError("profile questions need at least one profile")
    self.profiles = sorted(fields_by_profile)
    self.fields_by_profile = fields_by_profile
    values = {f: sorted({v[f] for v in fields_by_profile.values()}) for f in prompts.PROFILE_FIELDS}
    self.values = {f: v for f, v in values.items() if 2 <= len(v) <= prompts.MAX_OPTIONS}
    if not self.values:
      raise ValueError("no profile field has between 2 and 26 values to ask about")
    self.fields = tuple(self.values)
    self.users = {
      f: prompts.user_prompt(FIELD_QUESTIONS[f], choices) for f, choices in self.values.items()
    }

  def __len__(self) -> int:
    return len(self.profiles) * len(self.fields)

  def __iter__(self) -> Iterator[ProfileQuestion]:
    return (self[i] for i in range(len(self)))

  def __getitem__(self, index: int) -> ProfileQuestion:
    if not 0 <= index < len(self):
      raise IndexError(f"profile question {index} outside 0..{len(self) - 1}")
    profile = self.profiles[index // len(self.fields)]
    name = self.fields[index % len(self.fields)]
    choices = self.values[name]
    letter = prompts.LETTERS[choices.index(self.fields_by_profile[profile][name])]
    return ProfileQuestion(profile, self.users[name], letter, len(choices))
