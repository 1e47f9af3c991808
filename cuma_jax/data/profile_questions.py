"""Questions about a profile's own fields: a warm-up that teaches a backbone to read profiles.

Why: a text-only baseline can use the demographic system prompt only if its backbone attends to
it. A backbone warmed up on the survey without profiles has never needed to. These multiple-choice
questions ("Which country is this person from?") are answered from the system prompt alone, so a
warm-up that mixes them in teaches reading the profile without showing any culture's answers to
the survey (docs/data.md#profile-reading-warm-up).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from cuma_jax.data import prompts

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
NUM_CHOICES = 4


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

  Index ``i`` asks about field ``i % 8`` of profile ``i // 8`` (profiles sorted). The wrong
  choices are other values of that field among the profiles, drawn with a generator seeded
  by ``(seed, i)``, and the choices' order is shuffled the same way, so the letter carries no
  information.
  """

  def __init__(self, fields_by_profile: Mapping[str, Mapping[str, str]], seed: int = 0):
    if not fields_by_profile:
      raise ValueError("profile questions need at least one profile")
    self.profiles = sorted(fields_by_profile)
    self.fields_by_profile = fields_by_profile
    self.values = {
      f: sorted({v[f] for v in fields_by_profile.values()}) for f in prompts.PROFILE_FIELDS
    }
    self.seed = seed

  def __len__(self) -> int:
    return len(self.profiles) * len(prompts.PROFILE_FIELDS)

  def __getitem__(self, index: int) -> ProfileQuestion:
    if not 0 <= index < len(self):
      raise IndexError(f"profile question {index} outside 0..{len(self) - 1}")
    profile = self.profiles[index // len(prompts.PROFILE_FIELDS)]
    name = prompts.PROFILE_FIELDS[index % len(prompts.PROFILE_FIELDS)]
    truth = self.fields_by_profile[profile][name]
    rng = np.random.default_rng((self.seed, index))
    others = [v for v in self.values[name] if v != truth]
    wrong = rng.choice(len(others), min(NUM_CHOICES - 1, len(others)), replace=False)
    choices = [truth, *(others[i] for i in wrong)]
    order = rng.permutation(len(choices))
    choices = [choices[i] for i in order]
    letter = prompts.LETTERS[int(np.argmax(order == 0))]
    user = prompts.user_prompt(FIELD_QUESTIONS[name], choices)
    return ProfileQuestion(profile, user, letter, len(choices))
